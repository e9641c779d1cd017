"""Every method behind the one interface: closed-form parameter counts on ViT-B/16, merge
equivalence where the method allows it, adapters round-trip, and the trainable set is exact."""
import pytest
import timm
import torch
from conftest import tiny

import rlrr
from rlrr.methods.base import METHODS, get_method

D, MLP, L = 768, 3072, 12  # ViT-B/16

CLOSED_FORM = {
    "linear": 0,
    "bitfit": L * (3 * D + D + MLP + D + 2 * D) + 2 * D,  # qkv, proj, fc1, fc2, two LN biases; patch + final LN
    "ssf": L * (3 * D + D + MLP + D + 2 * D) * 2 + 2 * 2 * D,  # γ, β after those ops + patch embed + final norm
    "lora": L * 2 * 8 * (D + D),  # rank 8 on q and v: A (8×768) + B (768×8) each
    "adapter": L * (D * 8 + 8 + 8 * D + D),  # bottleneck 8
    "vpt": L * 10 * D,  # 10 prompt tokens per block
    "rlrr": L * (3 * 3 * D + 3 * D + (MLP + D + MLP) + (D + MLP + D) + 2 * 2 * D) + 2 * 2 * D,
}


@pytest.fixture(scope="module")
def vit_base_params():
    return sum(p.numel() for p in timm.create_model("vit_base_patch16_224", num_classes=100).parameters())


@pytest.mark.parametrize("name", list(CLOSED_FORM) + ["full"])
def test_vit_base_counts_match_closed_form(name, vit_base_params):
    model = rlrr.apply(timm.create_model("vit_base_patch16_224", num_classes=100), rlrr.make_config(name))
    s = rlrr.summary(model)
    expected = CLOSED_FORM.get(name, vit_base_params - 76_900)
    assert s["method_params"] == expected
    assert s["head_params"] == 76_900 and s["backbone_params"] == vit_base_params - 76_900


MERGEABLE = [n for n in ("rlrr", "ssf", "lora", "bitfit", "linear", "full")]


@pytest.mark.parametrize("name", MERGEABLE)
@pytest.mark.parametrize("family", ["vit", "swin", "convnext", "resnet"])
def test_merge_equivalence(name, family):
    model, x, tname, kwargs = tiny(family)
    if name == "lora" and family in ("convnext", "resnet"):
        with pytest.raises(ValueError, match="match no Linear"):
            rlrr.apply(model, rlrr.make_config(name))
        return
    keys = list(model.state_dict())
    model = rlrr.apply(model, rlrr.make_config(name))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in rlrr.trainable_parameters(model):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        ref = model.eval()(x)
        merged = rlrr.merge(model)
        assert list(merged.state_dict()) == keys
        fresh = timm.create_model(tname, **kwargs).eval()
        fresh.load_state_dict(merged.state_dict())
        assert torch.allclose(fresh(x), ref, atol=1e-5)


@pytest.mark.parametrize("name", ["adapter", "vpt"])
def test_unmergeable_methods_say_so(name):
    model, *_ = tiny("vit")
    rlrr.apply(model, rlrr.make_config(name))
    with pytest.raises(rlrr.MergeError, match="cannot be merged"):
        rlrr.merge(model)


@pytest.mark.parametrize("name", sorted(set(CLOSED_FORM) | {"full"}))
def test_adapter_round_trip_every_method(name, tmp_path):
    model, x, *_ = tiny("vit")
    model = rlrr.apply(model, rlrr.make_config(name)).eval()
    with torch.no_grad():
        for _, p in rlrr.trainable_parameters(model):
            p.add_(0.05)
        ref = model(x)
    path = rlrr.save_adapter(model, tmp_path / "a.safetensors")
    fresh, *_ = tiny("vit")
    loaded = rlrr.load_adapter(fresh, path).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x), ref, atol=1e-6)
    assert loaded.rlrr_method == name


@pytest.mark.parametrize("name", ["adapter", "lora"])
def test_zero_initialised_methods_start_at_the_pretrained_function(name):
    model, x, *_ = tiny("vit")
    with torch.no_grad():
        ref = model(x)
        assert torch.allclose(rlrr.apply(model, rlrr.make_config(name))(x), ref, atol=1e-6)


def test_lora_slices_act_on_q_and_v_only():
    model, x, *_ = tiny("vit")
    rlrr.apply(model, rlrr.make_config("lora"))
    layer = model.blocks[0].attn.qkv
    with torch.no_grad():
        for p in layer.lora_B:
            p.fill_(0.1)
        delta = layer.delta()
    d = 48
    assert delta[:d].abs().sum() > 0 and delta[d:2 * d].abs().sum() == 0 and delta[2 * d:].abs().sum() > 0


def test_every_method_registered_and_options_checked():
    assert {"rlrr", "ssf", "lora", "adapter", "vpt", "bitfit", "linear", "full"} <= set(METHODS)
    with pytest.raises(TypeError, match="no option"):
        rlrr.make_config("lora", rnak=4)
    with pytest.raises(KeyError, match="unknown method"):
        get_method("loha")


def test_rescale_after_layernorm_is_the_formula_and_keeps_no_activation():
    """γ, β fold into the LayerNorm's affine at every call: same outputs and gradients as
    ``LN(x)·γ + β`` written out, without the rescale saving the normalised tokens for backward."""
    from rlrr.engine.memory import saved_activation_bytes
    from rlrr.methods.ssf import FeatureRescale
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(16)
    torch.nn.init.normal_(norm.weight, 1.0, 0.1)
    torch.nn.init.normal_(norm.bias, 0.0, 0.1)
    fr = FeatureRescale(norm, std=0.1)
    assert fr.affine == ("weight", "bias")
    x = torch.randn(3, 5, 16, requires_grad=True)
    y = fr(x)
    y_ref = norm(x) * fr.scale + fr.shift
    assert torch.allclose(y, y_ref, atol=1e-6)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, fr.scale, fr.shift), g)
    want = torch.autograd.grad(y_ref, (x, fr.scale, fr.shift), g)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5)
    exclude = [*fr.parameters(), x]
    assert saved_activation_bytes(lambda: fr(x), exclude) < saved_activation_bytes(
        lambda: norm(x) * fr.scale + fr.shift, exclude)
