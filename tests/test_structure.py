"""Discovery and the wrapped layers on the architectures whose structure is unusual (issue #19's reach
list): Swin V2, RMSNorm / bias-free / Affine norms, bare Sequential blocks, norms nested in branches,
'same' padding, GlobalResponseNorm, weight-standardised convs.  Each family trains one step, merges
exactly and round-trips its adapter; the rules themselves are checked on the layers they are about."""
import re

import pytest
import timm
import torch
from conftest import round_trip
from torch import nn

import rlrr
from rlrr.backbones.discover import DiscoveryError, input_only_via_affine, discover, is_norm, role, trace
from rlrr.methods.ssf import FeatureRescale


def metaformer() -> nn.Module:
    """A two-stage-per-kind CAFormer: SepConv stages with LayerNorm2dNoBias, attention with LayerNormNoBias."""
    from timm.models import metaformer as mf
    return mf.MetaFormer(depths=(1, 1, 1, 1), dims=(32, 32, 32, 32), token_mixers=[mf.SepConv] * 2 + [mf.Attention] * 2,
                         norm_layers=[mf.LayerNorm2dNoBias] * 2 + [mf.LayerNormNoBias] * 2, num_classes=5)


def convmixer() -> nn.Module:
    from timm.models.convmixer import ConvMixer
    return ConvMixer(dim=16, depth=2, kernel_size=3, patch_size=4, num_classes=5)


def resmlp() -> nn.Module:
    from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock
    return MlpMixer(img_size=32, patch_size=8, num_blocks=2, embed_dim=16, mlp_ratio=4, block_layer=ResBlock,
                    norm_layer=Affine, num_classes=5)


def timm_tiny(name: str, **kw):
    return lambda: timm.create_model(name, pretrained=False, num_classes=5, **kw)


# name: (factory, input side)
FAMILIES = {
    "swinv2": (timm_tiny("swinv2_tiny_window8_256", img_size=32, embed_dim=16, depths=(1, 1), num_heads=(1, 2),
                         window_size=4), 32),
    "aimv2 (RMSNorm)": (timm_tiny("aimv2_large_patch14_224", img_size=28, embed_dim=32, depth=2, num_heads=2), 28),
    "caformer (bias-free LayerNorm)": (metaformer, 32),
    "resmlp (Affine)": (lambda: resmlp(), 32),
    "convmixer (Sequential blocks)": (convmixer, 32),
    "efficientvit_m0 (ConvNorm)": (timm_tiny("efficientvit_m0", img_size=64), 64),
    "mobileone_s0 (branches)": (timm_tiny("mobileone_s0"), 32),
    "ghostnet_050 (shortcut)": (timm_tiny("ghostnet_050"), 32),
    "convnextv2_atto (GRN)": (timm_tiny("convnextv2_atto", depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)), 32),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_rlrr_trains_merges_and_round_trips_on_unusual_structures(name, tmp_path):
    make, side = FAMILIES[name]
    round_trip(make, torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1)), tmp_path)


def test_rescaled_linear_output_may_be_modified_in_place():
    """Swin V2's position-bias MLP is Linear -> ReLU(inplace=True): the op's output must not be a view."""
    lin = rlrr.RescaledLinear(nn.Linear(8, 8))
    x = torch.randn(2, 3, 8, requires_grad=True)
    y = lin(x).relu_()
    y.sum().backward()
    assert x.grad is not None and lin.scale_l.grad is not None
    with torch.no_grad():
        ref = torch.relu(nn.functional.linear(x, *lin.effective()))
    assert torch.allclose(y, ref, atol=1e-6)


def test_wrapped_layers_answer_the_attributes_of_the_layer_they_replace():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2)
    r = rlrr.RescaledConv2d(conv)
    assert (r.stride, r.padding, r.dilation, r.groups, r.kernel_size, r.padding_mode) == \
        (conv.stride, conv.padding, conv.dilation, conv.groups, conv.kernel_size, conv.padding_mode)
    fr = FeatureRescale(nn.Conv2d(4, 6, 3, stride=2, bias=True))
    assert fr.stride == (2, 2) and fr.out_channels == 6 and fr.weight is fr.inner.weight
    lora = rlrr.apply(timm_tiny("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=1,
                                num_heads=3)(), rlrr.make_config("lora"))
    qkv = lora.blocks[0].attn.qkv
    assert (qkv.in_features, qkv.out_features, qkv.bias is qkv.base.bias) == (48, 144, True)
    with pytest.raises(AttributeError):
        qkv.no_such_attribute


def test_same_padding_with_an_odd_kernel_is_rescaled_and_merges_back_to_same():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding="same", dilation=2)
    r = rlrr.RescaledConv2d(conv, init="official")
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        w, b = r.effective()
        assert torch.allclose(r(x), nn.functional.conv2d(x, w, b, padding=2, dilation=2), atol=1e-5)
        merged = r.merged()
        assert merged.padding == "same" and torch.allclose(merged(x), r(x), atol=1e-5)
    with pytest.raises(ValueError, match="same"):
        rlrr.RescaledConv2d(nn.Conv2d(4, 4, 2, padding="same"))  # even kernel: asymmetric, no size says it


def test_a_norm_without_a_shift_gets_a_scale_only_and_merges():
    torch.manual_seed(0)
    norm = nn.RMSNorm(8)
    fr = FeatureRescale(norm, std=0.1)
    assert is_norm(norm) and fr.shift is None and fr.affine == ("weight", None)
    x = torch.randn(3, 8)
    with torch.no_grad():
        y = fr(x)
        assert torch.allclose(y, norm(x) * fr.scale, atol=1e-6)
        assert torch.allclose(fr.merged()(x), y, atol=1e-6)
    model = rlrr.apply(FAMILIES["aimv2 (RMSNorm)"][0](), rlrr.RLRRConfig())
    norms = [m for m in model.modules() if isinstance(m, FeatureRescale) and "rmsnorm" in type(m.inner).__name__.lower()]
    assert norms and all(m.shift is None for m in norms)


def test_resmlp_affine_is_a_norm_by_its_alpha_and_beta():
    model = FAMILIES["resmlp (Affine)"][0]().eval()
    found = discover(model)
    assert len(found.blocks) == 2 and {n.rsplit(".", 1)[-1] for n in found.norms} >= {"norm1", "norm2"}


def test_convmixer_blocks_are_bare_sequentials_and_a_deep_stem_is_no_block():
    found = discover(convmixer().eval())
    assert found.blocks == ("blocks.0", "blocks.1")
    assert set(found.norms) >= {"blocks.0.0.fn.2", "blocks.0.3"}  # the BatchNorm inside the Residual too
    resnet_d = timm.create_model("resnet18d", pretrained=False, num_classes=5).eval()
    assert not any(b.startswith("conv1") for b in discover(resnet_d).blocks)


def all_norms(model: nn.Module, block: str) -> set[str]:
    return {f"{block}.{n}" for n, m in model.get_submodule(block).named_modules() if n and is_norm(m)}


@pytest.mark.parametrize("name", ["efficientvit_m0 (ConvNorm)", "mobileone_s0 (branches)"])
def test_every_norm_of_a_block_is_rescaled_wherever_it_is_nested(name):
    model = FAMILIES[name][0]().eval()
    found = discover(model)
    inside = set().union(*(all_norms(model, b) for b in found.blocks))
    assert inside and inside <= set(found.norms)


def test_a_shortcut_norm_is_not_rescaled_but_the_main_path_is():
    model = FAMILIES["ghostnet_050 (shortcut)"][0]().eval()
    found = discover(model)
    shortcut = {n for n in found.norms if ".shortcut." in n}
    main = {n for b in found.blocks for n in all_norms(model, b) if ".shortcut." not in n}
    assert not shortcut and main <= set(found.norms)


def test_global_response_norm_is_not_folded_into():
    model = FAMILIES["convnextv2_atto (GRN)"][0]().eval()
    name = "stages.0.blocks.0.mlp.grn"
    grn = model.get_submodule(name)
    assert is_norm(grn) and not input_only_via_affine(grn, trace(model).shapes[name])
    assert not any(n.endswith("grn") for n in discover(model).norms)
    assert input_only_via_affine(nn.LayerNorm(8), (2, 8))
    from timm.layers import BatchNormAct2d  # the activation after the affine: the rescale folds in before it
    assert input_only_via_affine(BatchNormAct2d(8), (2, 8, 3, 3))
    found = discover(timm.create_model("efficientnet_b0", pretrained=False, num_classes=5).eval())
    assert {"blocks.1.0.bn1", "blocks.1.0.bn2", "blocks.1.0.bn3"} <= set(found.norms)


def test_swin_v2_adapts_what_its_forward_calls():
    """timm's Swin V2 reads ``qkv.weight`` (F.linear with its separate q/v biases), so q, k, v cannot be
    wrapped; proj, the MLP and the position-bias MLP are (the README's reach section says so)."""
    found = discover(FAMILIES["swinv2"][0]().eval())
    leaves = {n.split("blocks.0.", 1)[-1] for n in found.targets}
    assert "attn.qkv" not in leaves and {"attn.proj", "mlp.fc1", "mlp.fc2", "attn.cpb_mlp.0"} <= leaves


def test_dense_layers_get_their_role_from_their_parent():
    assert [role(n) for n in ("layer.0.attention.output.dense", "layer.0.intermediate.dense",
                              "layer.0.output.dense", "x.dense", "blocks.0.attn.qkv")] == \
        ["proj", "fc1", "fc2", None, "qkv"]


def test_weight_standardised_convs_are_refused_naming_them():
    from functools import partial

    from timm.layers import StdConv2d
    from timm.models.resnetv2 import ResNetV2
    model = ResNetV2(layers=(1, 1, 1, 1), channels=(128,) * 4, conv_layer=partial(StdConv2d, eps=1e-8),
                     stem_type="fixed", num_classes=5).eval()  # BiT's layout, tiny
    with pytest.raises(DiscoveryError, match=re.escape("StdConv2d")) as e:
        rlrr.apply(model, rlrr.RLRRConfig())
    assert "\n" not in str(e.value) and "targets=" in str(e.value)


def test_a_failed_structural_trace_is_a_warning_saying_what_was_skipped(caplog):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8,
                              embed_dim=48, depth=2, num_heads=3)

    def broken(x):
        raise RuntimeError("this forward needs an extra argument")
    model.forward = broken  # as a model whose forward cannot run on one example image
    assert trace(model) is None
    assert "structural trace of VisionTransformer failed (RuntimeError: this forward needs an extra argument)" \
        in caplog.text and "targets=REGEX" in caplog.text
