"""RLRR's design space (the paper's ablations as RLRRConfig options): each variant's formula by hand,
its gradients, its exact merge, its parameter count in closed form on ViT-B/16, and the refusals."""
import copy
import statistics

import pytest
import timm
import torch
from conftest import one_step, rel, tiny

import rlrr
from rlrr.backbones.discover import discover
from rlrr.cli import main
from rlrr.data.benchmarks import VTAB
from rlrr.methods.rlrr import RescaledConv2d, RescaledLinear

VARIANTS = [dict(scales="left"), dict(scales="right"), dict(residual=False), dict(scales="left", residual=False),
            dict(form="additive"), dict(init="normal"), dict(init="uniform"), dict(sites="attn,norm"),
            dict(sites="mlp"), dict(blocks="last:1"), dict(blocks=[0], sites=["attn"]), dict(rank=2, form="additive")]


def randomised(layer: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer


def test_left_only_without_residual_is_exactly_s_l_times_w():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    layer = randomised(RescaledLinear(base, scales="left", residual=False))
    assert not isinstance(layer.scale_r, torch.nn.Parameter)  # the other side is fixed ones, not trained
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["scale_l", "shift"]
    with torch.no_grad():
        w, _ = layer.effective()
        assert torch.equal(w, layer.scale_l[0, 0][:, None] * base.weight)
        x = torch.randn(3, 6)
        assert torch.allclose(layer(x), x @ (layer.scale_l[0, 0][:, None] * base.weight).T + base.bias + layer.shift)


@pytest.mark.parametrize("variant,expected", [
    (dict(scales="right"), lambda W, left, r: W + W * r[None, :]),
    (dict(residual=False), lambda W, left, r: W * torch.outer(left, r)),
    (dict(form="additive"), lambda W, left, r: W + torch.outer(left, r)),
])
def test_linear_variants_match_their_formula(variant, expected):
    torch.manual_seed(1)
    base = torch.nn.Linear(7, 4)
    layer = randomised(RescaledLinear(base, **variant))
    with torch.no_grad():
        w, b = layer.effective()
    assert torch.allclose(w, expected(base.weight, layer.scale_l[0, 0], layer.scale_r[0, 0]), atol=1e-6)
    assert torch.allclose(b, base.bias + layer.shift)


def test_additive_conv_adds_the_rank_one_matrix_in_the_official_view():
    torch.manual_seed(2)
    base = torch.nn.Conv2d(3, 4, 3, padding=1)
    layer = randomised(RescaledConv2d(base, form="additive"))
    s = torch.outer(layer.scale_l[0, 0], layer.scale_r[0, 0])  # (out·k) × (in·k), rows (o, kh), cols (i, kw)
    delta = s.reshape(4, 3, 3, 3).permute(0, 2, 1, 3)
    with torch.no_grad():
        assert torch.allclose(layer.effective()[0], base.weight + delta, atol=1e-6)


@pytest.mark.parametrize("variant", [dict(scales="left"), dict(residual=False), dict(form="additive"),
                                     dict(form="additive", rank=2)])
def test_variant_gradients_float64(variant):
    torch.manual_seed(0)
    lin = randomised(RescaledLinear(torch.nn.Linear(5, 6).double(), groups=3, **variant))
    x = torch.randn(2, 5, dtype=torch.double, requires_grad=True)
    lin.weight.requires_grad_(True)
    params = [p for p in (lin.weight, lin.bias, lin.scale_l, lin.scale_r, lin.shift) if p.requires_grad]
    assert torch.autograd.gradcheck(lambda x, *p: lin(x), (x, *params))
    conv = randomised(RescaledConv2d(torch.nn.Conv2d(2, 3, 3, padding=1).double(), **variant))
    x = torch.randn(1, 2, 5, 5, dtype=torch.double, requires_grad=True)
    params = [p for p in (conv.scale_l, conv.scale_r, conv.shift) if p.requires_grad]
    assert torch.autograd.gradcheck(lambda x, *p: conv(x), (x, *params))


@pytest.mark.parametrize("family", ["vit", "swin", "convnext"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={v[k]}" for k in v))
def test_every_variant_merges_exactly(family, variant, tmp_path):
    if family == "convnext" and "sites" in variant:
        pytest.skip("a convnet's conv_dw has no attention/MLP role: refused, tested below")
    model, x, *_ = tiny(family)
    types = {n: type(m) for n, m in model.named_modules()}
    keys = list(model.state_dict())
    model = rlrr.apply(model, rlrr.make_config("rlrr", **variant))
    one_step(model, x)
    with torch.no_grad():
        ref = model(x)
        merged = rlrr.merge(copy.deepcopy(model))
        assert rel(merged(x), ref) <= 1e-5
    assert list(merged.state_dict()) == keys and {n: type(m) for n, m in merged.named_modules()} == types
    path = rlrr.save_adapter(model, tmp_path / "a.safetensors")  # the options travel with the adapter
    fresh, *_ = tiny(family)
    with torch.no_grad():
        assert torch.allclose(rlrr.load_adapter(fresh, path).eval()(x), ref, atol=1e-6)


@pytest.fixture(scope="module")
def vit_b():
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10)
    discover(model)  # traced once; every deep copy keeps the result
    return model


def method_params(base, **options) -> int:
    return rlrr.summary(rlrr.apply(copy.deepcopy(base), rlrr.make_config("rlrr", **options)))["method_params"]


def test_vit_b_counts_follow_the_closed_forms(vit_b):
    d, h, depth = 768, 3072, 12
    ssf = 2 * 2 * d  # two per block
    attn = 3 * (d + d + d) + (d + d + d)  # q, k, v, proj: s_l + s_r + f each
    mlp = (h + d + h) + (d + h + d)
    ends = 2 * 2 * d  # patch-embedding and final-norm rescales
    assert method_params(vit_b) == depth * (attn + mlp + ssf) + ends == 288_768
    one_side = depth * (4 * d + h + d) + depth * (4 * d + h + d) + depth * ssf + ends  # one vector per layer + f
    assert method_params(vit_b, scales="left") == method_params(vit_b, scales="right") == one_side
    sites = {s: method_params(vit_b, sites=s) for s in ("attn", "mlp", "norm")}
    assert sites == {"attn": depth * attn, "mlp": depth * mlp, "norm": depth * ssf + ends}
    assert sum(sites.values()) == 288_768
    per_block = attn + mlp + ssf
    assert method_params(vit_b, blocks="last:3") == 3 * per_block + 2 * d  # + the final norm's rescale
    assert method_params(vit_b, blocks="first:2") == 2 * per_block + 2 * d  # + the patch embedding's
    assert method_params(vit_b, blocks=[0, -1]) == 2 * per_block + ends
    assert method_params(vit_b, form="additive") == method_params(vit_b, residual=False) == 288_768
    # Table 6's params column is with the head, averaged over the five FGVC heads: 0.39 M one-sided, 0.47 M both
    head = (d + 1) * statistics.fmean([200, 555, 102, 120, 196])
    assert round((one_side + head) / 1e6, 2) == 0.39 and round((288_768 + head) / 1e6, 2) == 0.47


def test_inits_start_where_documented():
    base = torch.nn.Linear(8, 6)
    zero = RescaledLinear(base, init="zero")
    x = torch.randn(4, 8)
    zero(x).sum().backward()
    assert zero.scale_l.grad.abs().max() == 0 and zero.scale_r.grad.abs().max() == 0  # S stays 0: no gradient
    assert zero.shift.grad.abs().max() > 0
    const = RescaledLinear(torch.nn.Linear(8, 6), init="constant", residual=False)
    with torch.no_grad():
        assert torch.equal(const.effective()[0], const.weight)  # ones without the residual: W' = W
    uni = RescaledLinear(torch.nn.Linear(64, 64), init="uniform")
    assert 0 <= uni.scale_l.min() and uni.scale_r.max() <= 1
    normal = RescaledLinear(torch.nn.Linear(256, 256), init="normal")
    assert 0.8 < normal.scale_r.std() < 1.2 and normal.scale_l.min() < 0


@pytest.mark.parametrize("options,words", [
    (dict(form="additive", residual=False), "no residual switch"),
    (dict(form="additive", scales="left"), "needs both vectors"),
    (dict(init="identity", residual=False), "W' = 0"),
    (dict(scales="top"), "scales must be one of"),
    (dict(sites="attn,ffn"), "sites must be one or more"),
    (dict(sites=[]), "sites must be one or more"),
    (dict(blocks="middle:2"), "first:K"),
    (dict(blocks=[]), "adapts nothing"),
    (dict(init="xavier"), "init must be one of"),
])
def test_bad_combinations_are_refused_in_one_line(options, words):
    with pytest.raises(ValueError, match=words) as e:
        rlrr.make_config("rlrr", **options)
    assert "\n" not in str(e.value)


def test_choices_the_model_cannot_honour_are_one_line_errors(capsys):
    convnext, *_ = tiny("convnext")
    with pytest.raises(ValueError, match="neither by name"):
        rlrr.apply(convnext, rlrr.make_config("rlrr", sites="mlp"))
    vit, *_ = tiny("vit")
    with pytest.raises(ValueError, match="model has 2 blocks"):
        rlrr.apply(vit, rlrr.make_config("rlrr", blocks=[5]))
    args = ["info", "--model", "vit_tiny_patch16_224", "--weights", "none", "--img-size", "32"]
    assert main(args + ["--method-opt", "form=additive", "--method-opt", "residual=false"]) == 2
    assert main(args + ["--method-opt", "blocks=last:20"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no residual switch" in err[0] and "12 blocks" in err[1]


def test_info_prints_the_chosen_options(capsys):
    assert main(["info", "--model", "vit_tiny_patch16_224", "--weights", "none", "--img-size", "32",
                 "--method-opt", "scales=left", "--method-opt", "sites=attn,mlp"]) == 0
    out = capsys.readouterr().out
    assert "scales=left" in out and "sites=attn,mlp" in out


def test_the_bank_refuses_ablation_forms(tmp_path):
    model, x, name, kw = tiny("vit")
    adapted = rlrr.apply(model, rlrr.make_config("rlrr", residual=False))
    path = rlrr.save_adapter(adapted, tmp_path / "t.safetensors")
    fresh, *_ = tiny("vit")
    bank = rlrr.AdapterBank(fresh)
    with pytest.raises(rlrr.AdapterMismatchError, match="without the residual"):
        bank.add("t", path)


def test_swin_follows_the_official_swin_code():
    """timm Swin as the official models/swin.py: one s_r over the fused qkv, the patch-merging reduction
    rescaled (no bias: no f), no SSF after the patch embedding; the count then gives Table 5's 0.41 M
    with the mean VTAB-1k head (one placement off would give 0.40 M)."""
    model = rlrr.apply(timm.create_model("swin_base_patch4_window7_224", pretrained=False, num_classes=10),
                       rlrr.RLRRConfig())
    assert type(model.patch_embed.norm) is torch.nn.LayerNorm
    assert isinstance(model.layers[1].downsample.reduction, RescaledLinear)
    assert model.layers[1].downsample.reduction.shift is None
    dims, depths = (128, 256, 512, 1024), (2, 2, 18, 2)
    per_block = 7 + 3 + 9 + 6 + 4  # (·d) qkv 3d+d+3d, proj 3d, fc1 4d+d+4d, fc2 d+4d+d, two SSF 4d
    count = sum(n * per_block * d for n, d in zip(depths, dims)) + sum(6 * d for d in dims[:3]) + 2 * 1024
    assert rlrr.summary(model)["method_params"] == count == 356_352
    head = 1025 * statistics.fmean(c for c, _ in VTAB.values())
    assert round((count + head) / 1e6, 2) == 0.41
    assert rlrr.summary(rlrr.apply(timm.create_model("swin_base_patch4_window7_224", pretrained=False),
                                   rlrr.RLRRConfig(reduction=False)))["method_params"] == count - 5376


def test_the_official_init_draws_in_its_historic_order():
    """s_l then s_r for each rank-1 term and row block, in turn: the random stream earlier releases (and
    every bench cell recorded before the design-space options) drew, so seeds keep their meaning."""
    torch.manual_seed(0)
    layer = RescaledLinear(torch.nn.Linear(8, 12), groups=3, rank=2)
    torch.manual_seed(0)
    torch.nn.Linear(8, 12)  # the base layer's own draws come first
    for k in range(2):
        for g in range(3):
            left, right = torch.empty(4, 1), torch.empty(1, 8)
            torch.nn.init.kaiming_uniform_(left)
            torch.nn.init.kaiming_uniform_(right)
            assert torch.equal(layer.scale_l[k, g], left[:, 0]) and torch.equal(layer.scale_r[k, g], right[0])
