"""Proof of reach on timm: structure discovery reproduces the four hand-written families, and RLRR plus
every harness method applies, trains one step, merges exactly and round-trips its adapter on tiny
random members of many architecture families (no downloads)."""
import re

import pytest
import torch
from conftest import applied, one_step, rel, round_trip, tiny
from torch import nn

import rlrr
from rlrr.backbones.discover import DiscoveryError, discover

# The targets/norms the project once wrote by hand per family (the official code's choices); discovery
# must find exactly these.  ViT's patch embedding is rescaled at its projection (the same function).
HAND = {
    "vit": (r"blocks\.\d+\.(attn\.(qkv|q|k|v|proj)|mlp\.fc[12])", r"blocks\.\d+\.norm[12]|patch_embed\.proj|norm|fc_norm"),
    "swin": (r"layers\.\d+\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])",
             r"layers\.\d+\.blocks\.\d+\.norm[12]|patch_embed\.norm|norm"),
    "convnext": (r"stages\.\d+\.blocks\.\d+\.(conv_dw|mlp\.fc[12])", r"stages\.\d+\.blocks\.\d+\.norm|stem\.1|head\.norm"),
    "resnet": (r"layer\d\.\d+\.(conv\d|downsample\.0)", r"layer\d\.\d+\.bn\d|bn1"),
}


@pytest.mark.parametrize("family", list(HAND))
def test_discovery_reproduces_the_hand_written_families(family):
    model, *_ = tiny(family)
    found = discover(model)
    linear, norms = (re.compile(p) for p in HAND[family])
    names = [n for n, m in model.named_modules() if not isinstance(m, nn.Identity)]
    assert set(found.targets) == {n for n in names if linear.fullmatch(n)}
    assert set(found.norms) == {n for n in names if norms.fullmatch(n)}
    if family in ("vit", "swin"):  # RLRR's layout policy: the official Swin shares one s_r over its fused qkv
        import copy
        adapted = rlrr.apply(copy.deepcopy(model), rlrr.make_config("rlrr"))
        groups = {m.groups for n, m in adapted.named_modules() if n.endswith("qkv")}
        assert groups == {1 if family == "swin" else 3}


def test_discovery_runs_one_forward_per_module_tree():
    import copy
    model, *_ = tiny("vit")
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    found = discover(model)
    assert discover(model) is found and discover(copy.deepcopy(model)) == found and len(calls) == 1
    model.head = nn.Identity()  # another tree: discovered again, without the head's change leaking in
    assert discover(model).targets == found.targets and len(calls) == 2
    adapted = rlrr.apply(copy.deepcopy(model), rlrr.make_config("lora"))
    assert discover(adapted) != discover(model)


def test_swin_patch_merging_is_a_transition_rescaled_on_request():
    model, *_ = tiny("swin")
    assert discover(model).transitions == ("layers.1.downsample.reduction",)
    rlrr.apply(model, rlrr.RLRRConfig(reduction=True))
    assert isinstance(model.layers[1].downsample.reduction, rlrr.RescaledLinear)


# name: (timm kwargs for a tiny member, methods beyond rlrr/ssf/bitfit that apply)
ARCHS = {
    "vit_tiny_patch16_224": (dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3), {"lora", "adapter", "vpt"}),
    "deit_tiny_distilled_patch16_224": (dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3),
                                        {"lora", "adapter", "vpt"}),
    "vit_small_patch14_reg4_dinov2": (dict(img_size=28, patch_size=14, embed_dim=48, depth=2, num_heads=3),
                                      {"lora", "adapter", "vpt"}),  # register tokens, LayerScale
    "eva02_tiny_patch14_224": (dict(img_size=28, patch_size=14, embed_dim=48, depth=2, num_heads=3), {"adapter"}),
    "beit_base_patch16_224": (dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3), {"adapter"}),
    "cait_xxs24_224": (dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3), {"lora", "adapter"}),
    "xcit_nano_12_p16_224": (dict(img_size=32, embed_dim=48, depth=2, num_heads=3), {"lora", "adapter"}),
    "convit_tiny": (dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3), {"lora", "adapter"}),
    "pit_ti_224": (dict(img_size=64), {"lora", "adapter"}),
    "pvt_v2_b0": (dict(depths=(1, 1, 1, 1)), {"lora", "adapter"}),  # its MLP also takes the feature size
    "swin_tiny_patch4_window7_224": (dict(img_size=56, embed_dim=24, depths=(1, 1), num_heads=(1, 2)), {"lora", "adapter"}),
    "hiera_tiny_224": (dict(img_size=(64, 64)), {"lora", "adapter"}),
    "maxvit_rmlp_pico_rw_256": (dict(img_size=64), {"lora", "adapter"}),
    "coatnet_nano_rw_224": (dict(img_size=64), set()),
    "fastvit_t8": (dict(), set()),
    "convnext_atto": (dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)), set()),
    "resnet18": (dict(layers=(1, 1, 1, 1)), set()),
    "regnetx_002": (dict(), set()),
    "efficientnet_b0": (dict(), set()),
    "mobilenetv3_small_050": (dict(), set()),
    "levit_128s": (dict(img_size=64), set()),
}


def build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A tiny random member of ``name`` (through rlrr's own creation path) and an input batch of its size."""
    kwargs, _ = ARCHS[name]
    torch.manual_seed(seed)
    model = rlrr.create_backbone(name, weights="none", num_classes=5, **kwargs).eval()
    size = model.pretrained_cfg["input_size"]
    return model, torch.randn(2, *size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(ARCHS))
def test_rlrr_reaches_every_architecture(name, tmp_path):
    round_trip(lambda: build(name)[0], build(name)[1], tmp_path)


@pytest.mark.parametrize("name", list(ARCHS))
def test_every_harness_method_applies_or_says_why(name):
    _, extra = ARCHS[name]
    # the methods after RLRR: HTA and APLA need attention maps, peft's tuners nn.Linear layers (LeViT's
    # convolution-free attention has them), PACE goes wherever its inner method does
    later = {"rlrr+pace"} | ({"hta", "apla", "peft:lora"} if extra else set()) | \
        ({"adapter+pace"} if "adapter" in extra else set()) | \
        ({"peft:lora"} if name == "levit_128s" else set())
    for method in ("ssf", "bitfit", "lora", "adapter", "vpt", "hta", "apla", "rlrr+pace", "adapter+pace", "peft:lora"):
        if method.startswith("peft:"):
            pytest.importorskip("peft")
        model, x = build(name)
        model = applied(model, method, fits=method in extra | later | {"ssf", "bitfit"})
        if model is None:
            continue
        one_step(model, x)
        with torch.no_grad():
            ref = model(x)
            if method.split("+")[0] not in ("adapter", "vpt"):  # the two that do not merge
                assert rel(rlrr.merge(model)(x), ref) <= 1e-5


def test_a_model_with_nothing_to_discover_names_the_targets_option():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    with pytest.raises(DiscoveryError, match="targets=") as e:
        rlrr.apply(model, rlrr.RLRRConfig())
    assert "\n" not in str(e.value)


class Plain(nn.Module):
    """Neither timm nor HF: two residual blocks of a LayerNorm and a Linear, then a head."""

    def __init__(self):
        super().__init__()
        self.norms = nn.ModuleList([nn.LayerNorm(8), nn.LayerNorm(8)])
        self.lins = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        for n, lin in zip(self.norms, self.lins):
            x = x + lin(n(x))
        return self.out(x)


def test_targets_and_norms_regexes_adapt_a_plain_module():
    model, x = Plain().eval(), torch.randn(4, 8)
    model = rlrr.apply(model, rlrr.RLRRConfig(targets=r"lins\.\d", norms=r"norms\.\d", train_head=False))
    assert [n for n, _ in rlrr.trainable_parameters(model)] == [
        "norms.0.scale", "norms.0.shift", "norms.1.scale", "norms.1.shift",
        "lins.0.scale_l", "lins.0.scale_r", "lins.0.shift", "lins.1.scale_l", "lins.1.scale_r", "lins.1.shift"]
    with torch.no_grad():
        ref = model(x)
        assert rel(rlrr.merge(model)(x), ref) <= 1e-5
    with pytest.raises(DiscoveryError, match="matches targets"):
        rlrr.apply(Plain(), rlrr.RLRRConfig(targets="nothing_here"))
