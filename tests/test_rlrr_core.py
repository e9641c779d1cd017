"""RLRR core: the layer formula, qkv grouping, merge, parameter count, adapters, gradients."""
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import TINY, tiny

import rlrr
from rlrr.engine.memory import saved_activation_bytes
from rlrr.methods.rlrr import RescaledConv2d, RescaledLinear


def perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Move every trainable parameter away from its init so merges are tested on non-trivial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in rlrr.trainable_parameters(model):
            p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("groups,rank", [(1, 1), (3, 1), (3, 2)])
def test_linear_matches_direct_formula(groups, rank):
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 9)
    layer = RescaledLinear(base, groups=groups, rank=rank)
    perturb(layer)
    x = torch.randn(4, 5, 12)
    W, b = base.weight, base.bias
    S = torch.zeros_like(W)
    rows = 9 // groups
    for k in range(rank):
        for g in range(groups):
            S[g * rows:(g + 1) * rows] += torch.outer(layer.scale_l[k, g], layer.scale_r[k, g])
    expected = x @ (W + S * W).T + b + layer.shift
    assert torch.allclose(layer(x), expected, atol=1e-5)
    layer.eval()
    with torch.no_grad():
        assert torch.allclose(layer(x), expected, atol=1e-5)  # cached inference path


def test_conv_matches_official_matrix_view():
    torch.manual_seed(0)
    base = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1)
    layer = RescaledConv2d(base)
    perturb(layer)
    o, i, k, _ = base.weight.shape
    # official: view W as (o*k) x (i*k) via permute to (o, k, i, k)
    wm = base.weight.permute(0, 2, 1, 3).reshape(o * k, i * k)
    wm = wm + wm * torch.outer(layer.scale_l[0, 0], layer.scale_r[0, 0])
    w = wm.reshape(o, k, i, k).permute(0, 2, 1, 3)
    x = torch.randn(2, 4, 9, 9)
    expected = F.conv2d(x, w, base.bias + layer.shift, stride=2, padding=1)
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_fused_qkv_equals_three_official_layers():
    torch.manual_seed(0)
    d = 8
    qkv = torch.nn.Linear(d, 3 * d)
    fused = RescaledLinear(qkv, groups=3)
    perturb(fused)
    x = torch.randn(3, 4, d)
    outs = []
    for g in range(3):
        sep = torch.nn.Linear(d, d)
        with torch.no_grad():
            sep.weight.copy_(qkv.weight[g * d:(g + 1) * d])
            sep.bias.copy_(qkv.bias[g * d:(g + 1) * d])
        layer = RescaledLinear(sep)
        with torch.no_grad():
            layer.scale_l.copy_(fused.scale_l[:, g:g + 1])
            layer.scale_r.copy_(fused.scale_r[:, g:g + 1])
            layer.shift.copy_(fused.shift[g * d:(g + 1) * d])
        outs.append(layer(x))
    assert torch.allclose(fused(x), torch.cat(outs, -1), atol=1e-6)


def test_gradcheck_float64():
    torch.manual_seed(0)
    lin = RescaledLinear(torch.nn.Linear(5, 6).double(), groups=3, rank=2)
    x = torch.randn(2, 3, 5, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *p: lin(x), (x, lin.scale_l, lin.scale_r, lin.shift))
    conv = RescaledConv2d(torch.nn.Conv2d(3, 4, 3, padding=1, groups=1).double())
    x = torch.randn(2, 3, 5, 5, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *p: conv(x), (x, conv.scale_l, conv.scale_r, conv.shift))
    dw = RescaledConv2d(torch.nn.Conv2d(4, 4, 3, padding=1, groups=4).double())
    x = torch.randn(1, 4, 5, 5, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *p: dw(x), (x, dw.scale_l, dw.scale_r, dw.shift))
    # an unfrozen base weight and bias (e.g. RLRR on top of full fine-tuning) get their gradients too
    lin.weight.requires_grad_(True)
    lin.bias.requires_grad_(True)
    x = torch.randn(2, 3, 5, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *p: lin(x), (x, lin.weight, lin.bias, lin.scale_l, lin.scale_r))


def test_backward_keeps_no_effective_weight():
    """W' is recomputed in backward: autograd keeps nothing but the layer's input and its parameters,
    where the textbook formula keeps a W' per layer until backward reaches it."""
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 256)
    lin = RescaledLinear(base)
    x = torch.randn(2, 8, 64, requires_grad=True)
    assert saved_activation_bytes(lambda: lin(x), [*lin.parameters(), x]) == 0
    s = torch.outer(lin.scale_l[0, 0], lin.scale_r[0, 0])
    naive = saved_activation_bytes(lambda: F.linear(x, base.weight + s * base.weight, base.bias + lin.shift),
                                   [*lin.parameters(), x])
    assert naive >= base.weight.numel() * base.weight.element_size()
    conv = RescaledConv2d(torch.nn.Conv2d(8, 16, 3, padding=1))
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    assert saved_activation_bytes(lambda: conv(x), [*conv.parameters(), x]) == 0


@pytest.mark.parametrize("family", list(TINY))
def test_merge_is_exact_and_restores_the_timm_model(family):
    model, x, name, kwargs = tiny(family)
    plain_keys = list(model.state_dict())
    plain_types = [type(m) for m in model.modules()]
    model = rlrr.apply(model, rlrr.RLRRConfig())
    perturb(model)
    model.eval()
    with torch.no_grad():
        before = model(x)
        merged = rlrr.merge(model)
        after = merged(x)
    assert torch.allclose(before, after, atol=1e-5), (before - after).abs().max()
    assert list(merged.state_dict()) == plain_keys
    assert [type(m) for m in merged.modules()] == plain_types
    fresh = timm.create_model(name, pretrained=False, **kwargs).eval()
    fresh.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(fresh(x), before, atol=1e-5)


def test_identity_init_starts_at_the_pretrained_function():
    model, x, *_ = tiny("vit")
    with torch.no_grad():
        ref = model(x)
        out = rlrr.apply(model, rlrr.RLRRConfig(init="identity"))(x)
    assert torch.allclose(ref, out, atol=1e-6)


def test_official_init_moves_the_function():
    model, x, *_ = tiny("vit")
    with torch.no_grad():
        ref = model(x)
        out = rlrr.apply(model, rlrr.RLRRConfig())(x)
    assert not torch.allclose(ref, out, atol=1e-3)


def test_vit_base_parameter_count_is_the_papers():
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
    model = rlrr.apply(model, rlrr.RLRRConfig())
    s = rlrr.summary(model)
    assert s["method_params"] == 288_768 == 12 * 23_808 + 2 * 1_536
    assert s["head_params"] == 768 * 100 + 100
    assert s["backbone_params"] == sum(p.numel() for p in timm.create_model("vit_base_patch16_224").parameters()) - 769_000
    assert "288,768 method" in rlrr.format_summary(s)


def test_qkv_mode_is_a_config_choice():
    counts = {}
    for mode in ("split", "fused"):
        model, *_ = tiny("vit")
        rlrr.apply(model, rlrr.RLRRConfig(qkv=mode, norm_rescale=False))
        counts[mode] = model.blocks[0].attn.qkv.scale_r.numel()
    assert counts == {"split": 3 * 48, "fused": 48}
    swin, *_ = tiny("swin")
    rlrr.apply(swin, rlrr.RLRRConfig())
    assert swin.layers[0].blocks[0].attn.qkv.groups == 1  # official Swin: one shared s_r


def test_rank_extension_counts_and_merges():
    model, x, *_ = tiny("vit")
    rlrr.apply(model, rlrr.RLRRConfig(rank=3))
    assert model.blocks[0].mlp.fc1.scale_l.shape == (3, 1, 192)
    perturb(model)
    with torch.no_grad():
        a = model(x)
        assert torch.allclose(rlrr.merge(model)(x), a, atol=1e-5)


def test_only_rlrr_and_head_get_gradients():
    model, x, *_ = tiny("vit")
    model = rlrr.apply(model, rlrr.RLRRConfig()).train()
    model(x).square().mean().backward()
    trainable = dict(rlrr.trainable_parameters(model))
    assert set(trainable) == set(rlrr.methods.base.added_parameters(model)) | {"head.weight", "head.bias"}
    for n, p in model.named_parameters():
        if n in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_adapter_round_trip(tmp_path):
    model, x, name, kwargs = tiny("vit")
    model = rlrr.apply(model, rlrr.RLRRConfig(rank=2, qkv="fused")).eval()
    perturb(model)
    path = rlrr.save_adapter(model, tmp_path / "a.safetensors")
    assert path.stat().st_size < 200_000
    with torch.no_grad():
        ref = model(x)
    fresh, *_ = tiny("vit")  # same backbone weights (same seed): the adapter does not carry them
    torch.manual_seed(123)  # a different init of everything the adapter carries
    loaded = rlrr.load_adapter(fresh, path)
    assert loaded.rlrr_config == rlrr.RLRRConfig(rank=2, qkv="fused")
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)


def test_adapter_on_wrong_backbone_fails_in_one_line(tmp_path):
    model, _, name, kwargs = tiny("vit")
    path = rlrr.save_adapter(rlrr.apply(model, rlrr.RLRRConfig()), tmp_path / "a.safetensors")
    wider = timm.create_model(name, pretrained=False, **{**kwargs, "embed_dim": 96})
    with pytest.raises(rlrr.AdapterMismatchError) as e:
        rlrr.load_adapter(wider, path)
    msg = str(e.value)
    assert "\n" not in msg and "patch_embed.proj.scale" in msg and "(96,)" in msg and "(48,)" in msg
    other_classes = timm.create_model(name, pretrained=False, **{**kwargs, "num_classes": 7})
    with pytest.raises(rlrr.AdapterMismatchError, match="head.weight.*num_classes"):
        rlrr.load_adapter(other_classes, path)
    swin, *_ = tiny("swin")
    with pytest.raises(rlrr.AdapterMismatchError, match="trained on vit_tiny_patch16_224"):
        rlrr.load_adapter(swin, path)


def test_bad_adapter_file(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a safetensors file")
    model, *_ = tiny("vit")
    with pytest.raises(rlrr.AdapterMismatchError, match="not a readable"):
        rlrr.load_adapter(model, bad)
    with pytest.raises(FileNotFoundError, match="not found"):
        rlrr.load_adapter(model, tmp_path / "missing.safetensors")


def write_google_npz(path, depth=2, dim=48, heads=3, patch=8, img=32, mlp=192, classes=5, seed=0):
    """A checkpoint in the key layout of Google's ViT release (the .npz the official code loads)."""
    rng = np.random.default_rng(seed)
    r = lambda *s: rng.standard_normal(s).astype(np.float32) * 0.02  # noqa: E731
    n = (img // patch) ** 2 + 1
    w = {"embedding/kernel": r(patch, patch, 3, dim), "embedding/bias": r(dim), "cls": r(1, 1, dim),
         "Transformer/posembed_input/pos_embedding": r(1, n, dim),
         "Transformer/encoder_norm/scale": 1 + r(dim), "Transformer/encoder_norm/bias": r(dim),
         "head/kernel": r(dim, classes), "head/bias": r(classes)}
    hd = dim // heads
    for i in range(depth):
        p = f"Transformer/encoderblock_{i}/"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            w[p + ln + "/scale"], w[p + ln + "/bias"] = 1 + r(dim), r(dim)
        for qkv in ("query", "key", "value"):
            w[p + f"MultiHeadDotProductAttention_1/{qkv}/kernel"] = r(dim, heads, hd)
            w[p + f"MultiHeadDotProductAttention_1/{qkv}/bias"] = r(heads, hd)
        w[p + "MultiHeadDotProductAttention_1/out/kernel"] = r(heads, hd, dim)
        w[p + "MultiHeadDotProductAttention_1/out/bias"] = r(dim)
        w[p + "MlpBlock_3/Dense_0/kernel"], w[p + "MlpBlock_3/Dense_0/bias"] = r(dim, mlp), r(mlp)
        w[p + "MlpBlock_3/Dense_1/kernel"], w[p + "MlpBlock_3/Dense_1/bias"] = r(mlp, dim), r(dim)
    np.savez(path, **w)
    return w


def test_google_npz_loading(tmp_path):
    w = write_google_npz(tmp_path / "ViT-tiny.npz")
    _, _, name, kwargs = tiny("vit")
    model = rlrr.create_backbone(name, weights=tmp_path / "ViT-tiny.npz", **kwargs)
    q = w["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel"].reshape(48, 48).T
    assert np.allclose(model.blocks[1].attn.qkv.weight[:48].detach().numpy(), q)
    k = w["embedding/kernel"].transpose(3, 2, 0, 1)
    assert np.allclose(model.patch_embed.proj.weight.detach().numpy(), k)
    assert np.allclose(model.blocks[0].mlp.fc2.bias.detach().numpy(), w["Transformer/encoderblock_0/MlpBlock_3/Dense_1/bias"])
    # a different class count keeps the fresh head (fine-tuning), everything else still loads
    model10 = rlrr.create_backbone(name, weights=tmp_path / "ViT-tiny.npz", **{**kwargs, "num_classes": 10})
    assert model10.head.weight.shape == (10, 48)
    assert torch.equal(model10.blocks[1].attn.qkv.weight, model.blocks[1].attn.qkv.weight)
    with pytest.raises(rlrr.BackboneError, match="matching ViT size"):
        rlrr.create_backbone(name, weights=tmp_path / "ViT-tiny.npz", **{**kwargs, "embed_dim": 96})


def test_state_dict_files(tmp_path):
    from safetensors.torch import save_file
    src, x, name, kwargs = tiny("convnext", seed=3)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save({"model": src.state_dict()}, tmp_path / "w.pth")
    for f in ("w.safetensors", "w.pth"):
        m = rlrr.create_backbone(name, weights=tmp_path / f, **kwargs).eval()
        with torch.no_grad():
            assert torch.equal(m(x), src(x))
    torch.save({"model": src.state_dict(), "evil": object()}, tmp_path / "pickle.pth")
    with pytest.raises(rlrr.BackboneError, match="weights-only"):
        rlrr.create_backbone(name, weights=tmp_path / "pickle.pth", **kwargs)
    with pytest.raises(rlrr.BackboneError, match="not found"):
        rlrr.create_backbone(name, weights=tmp_path / "nope.safetensors", **kwargs)


def test_offline_pretrained_fails_fast_with_instructions(tmp_path):
    code = ("import rlrr\ntry:\n rlrr.create_backbone('vit_tiny_patch16_224')\n"
            "except rlrr.BackboneError as e:\n print('ERR', e)")
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    t = time.time()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert time.time() - t < 60
    assert out.stdout.startswith("ERR") and "model.safetensors" in out.stdout and "weights=PATH" in out.stdout
