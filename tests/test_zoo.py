"""The methods after RLRR (PACE, HTA, APLA) and peft's tuners behind the same interface."""
import copy

import pytest
import timm
import torch
from conftest import tiny

import rlrr
from rlrr.methods.base import MergeError, cross_entropy
from rlrr.methods.hta import HTALinear
from rlrr.methods.peft import VERIFIED

D, L = 768, 12


def vit_base():
    return timm.create_model("vit_base_patch16_224", num_classes=100)


def test_hta_and_apla_counts_match_their_closed_forms():
    assert rlrr.summary(rlrr.apply(vit_base(), rlrr.make_config("hta")))["method_params"] == L * 4 * 5 * D  # 184,320
    assert rlrr.summary(rlrr.apply(vit_base(), rlrr.make_config("apla")))["method_params"] == L * (8 * D + 8)
    full = rlrr.summary(rlrr.apply(vit_base(), rlrr.make_config("apla", r="full")))
    assert full["method_params"] == L * (D * D + D) and full["added_params"] == 0


def perturb(model, scale=0.05):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in rlrr.trainable_parameters(model):
            p.add_(scale * torch.randn(p.shape, generator=g))


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", ["hta", "apla", "rlrr+pace", "lora+pace", "ssf+pace", "hta+pace"])
def test_merges_exactly_into_the_plain_model(name):
    model, x, tname, kwargs = tiny("vit")
    keys = list(model.state_dict())
    model = rlrr.apply(model, rlrr.make_config(name)).eval()
    perturb(model)
    with torch.no_grad():
        ref = model(x)
        merged = rlrr.merge(model)
    assert list(merged.state_dict()) == keys and not hasattr(merged, "objective")
    fresh = timm.create_model(tname, **kwargs).eval()
    fresh.load_state_dict(merged.state_dict())
    with torch.no_grad():
        assert rel(fresh(x), ref) <= 1e-5


def test_hta_applies_tokens_without_forming_the_matrix_and_starts_at_zero():
    lin = torch.nn.Linear(16, 48)
    hta = HTALinear(lin, [(0, 16), (32, 48)])  # q and v slices of a fused qkv
    x = torch.randn(3, 5, 16)
    assert torch.equal(hta(x), lin(x))  # zero start: d = 0, v = 0
    with torch.no_grad():
        for p in hta.units:
            p.normal_()
        dense = torch.zeros(48, 16)
        dense[0:16], dense[32:48] = HTALinear.dense(hta.units[0]), HTALinear.dense(hta.units[1])
        assert torch.allclose(hta(x), lin(x) + x @ dense.T, atol=1e-5)


def test_apla_trains_only_r_rows_even_under_weight_decay():
    model, x, *_ = tiny("vit")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model = rlrr.apply(model, rlrr.make_config("apla", r=4))
    opt = torch.optim.AdamW([p for _, p in rlrr.trainable_parameters(model)], lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(2):
        cross_entropy(model, x, torch.tensor([0, 1]))[0].backward()
        opt.step()
        opt.zero_grad()
    merged = rlrr.merge(model)
    for name, p in merged.named_parameters():
        changed = (p.detach() != before[name]).reshape(p.shape[0], -1).any(-1) if p.ndim else p != before[name]
        if name.endswith("attn.proj.weight") or name.endswith("attn.proj.bias"):
            assert int(changed.sum()) == 4, name  # exactly r output rows (and their bias entries) moved
        elif not name.startswith("head"):
            assert not changed.any(), name


@pytest.mark.parametrize("inner", ["rlrr", "lora", "ssf", "adapter"])
def test_pace_without_noise_and_consistency_is_the_plain_step(inner):
    model_a, x, *_ = tiny("vit")
    model_b, *_ = tiny("vit")
    y = torch.tensor([1, 3])
    results = []
    for model, cfg in ((model_a, rlrr.make_config(inner)), (model_b, rlrr.make_config(f"{inner}+pace", sigma=0, lam=0))):
        torch.manual_seed(0)
        model = rlrr.apply(model, cfg).train()
        opt = torch.optim.AdamW([p for _, p in rlrr.trainable_parameters(model)], lr=1e-2)
        loss, _ = getattr(model, "objective", cross_entropy)(model, x, y)
        loss.backward()
        opt.step()
        results.append((loss.item(), [p.detach().clone() for _, p in rlrr.trainable_parameters(model)]))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_pace_noise_schedule_training_only_and_shared_drop_path():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3,
                              num_classes=5, drop_path_rate=0.5)
    x = torch.randn(2, 3, 32, 32)
    plain = copy.deepcopy(model)
    model = rlrr.apply(model, rlrr.make_config("rlrr+pace", sigma=2.0, lam=0.5))
    sigmas = {n.split(".")[1]: m.pace_sigma for n, m in model.named_modules() if n.startswith("blocks.")
              and hasattr(m, "pace_sigma")}
    assert sigmas == {"0": 2.0, "1": 1.5, "2": 1.0, "3": 0.5}  # σ·(L − i)/L
    quiet = rlrr.apply(copy.deepcopy(plain), rlrr.make_config("rlrr+pace", sigma=3.0, quiet_blocks=1))
    assert {n.split(".")[1]: m.pace_sigma for n, m in quiet.named_modules() if n.startswith("blocks.")
            and hasattr(m, "pace_sigma")} == {"0": 0.0, "1": 3.0, "2": 2.0, "3": 1.0}  # the official ViT-B
    with pytest.raises(ValueError, match="quiet_blocks=4 leaves none of the model's 4 blocks noisy"):
        rlrr.apply(copy.deepcopy(plain), rlrr.make_config("rlrr+pace", quiet_blocks=4))
    assert all(m.pace_sigma == 0 for n, m in model.named_modules() if hasattr(m, "pace_sigma")
               and not n.startswith("blocks."))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # no noise (and no drop path) in eval
    model.train()
    with torch.no_grad():
        assert not torch.allclose(model(x), model(x))
        for m in model.modules():
            if hasattr(m, "pace_sigma"):
                m._forward_hooks.clear()  # noise off, DropPath hooks kept: both copies must agree
        both = model(torch.cat([x, x]))
    assert torch.equal(both[:2], both[2:])


def test_pace_objective_adds_the_consistency_term():
    model, x, *_ = tiny("vit")
    model = rlrr.apply(model, rlrr.make_config("rlrr+pace", sigma=1.0, lam=0.3)).train()
    y = torch.tensor([0, 2])
    torch.manual_seed(5)
    loss, logits = model.objective(model, x, y)
    torch.manual_seed(5)
    both = model(torch.cat([x, x]))
    ce = torch.nn.functional.cross_entropy(both[:2], y)
    assert torch.allclose(loss, ce + 0.3 * (both[:2] - both[2:]).pow(2).sum(-1).mean())
    assert torch.equal(logits, both[:2]) and loss > ce


def test_pace_refuses_methods_without_a_frozen_path():
    model, *_ = tiny("vit")
    with pytest.raises(ValueError, match="frozen output plus a residual"):
        rlrr.apply(model, rlrr.make_config("bitfit+pace"))


def test_pace_and_method_options_round_trip_through_adapter_files(tmp_path):
    model, x, *_ = tiny("vit")
    model = rlrr.apply(model, rlrr.make_config("rlrr+pace", sigma=0.5, rank=2)).eval()
    perturb(model)
    path = rlrr.save_adapter(model, tmp_path / "a.safetensors")
    fresh, *_ = tiny("vit")
    loaded = rlrr.load_adapter(fresh, path).eval()
    assert loaded.rlrr_config.sigma == 0.5 and loaded.rlrr_config.inner.rank == 2
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


# peft's tuners: apply with defaults on the discovered block linears, one step, merge where peft can;
# the options fit sizes to the tiny model (width 48), whose layers are smaller than the defaults assume
PEFT_OPTIONS = {"fourierft": {"n_frequency": 64}, "boft": {"boft_block_size": 4}, "vblora": {"vector_length": 16},
                "miss": {"r": 8}, "road": {"group_size": 16}, "shira": {"r": 4}, "c3a": {"block_size": 16},
                "waveft": {"n_frequency": 64}}
PEFT_NO_MERGE = {"lily"}


@pytest.mark.parametrize("tuner", VERIFIED)
def test_peft_tuner_trains_merges_and_round_trips(tuner, tmp_path):
    pytest.importorskip("peft")
    model, x, tname, kwargs = tiny("vit")
    keys = list(model.state_dict())
    model = rlrr.apply(model, rlrr.make_config(f"peft:{tuner}", **PEFT_OPTIONS.get(tuner, {})))
    s = rlrr.summary(model)
    assert s["method_params"] > 0 and s["added_params"] > 0 and s["head_params"] == 245
    opt = torch.optim.Adam([p for _, p in rlrr.trainable_parameters(model)], lr=1e-2)
    model.train()
    cross_entropy(model, x, torch.tensor([0, 1]))[0].backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        ref = model(x)
    path = rlrr.save_adapter(model, tmp_path / "a.safetensors")
    fresh, *_ = tiny("vit")
    with torch.no_grad():
        assert torch.allclose(rlrr.load_adapter(fresh, path).eval()(x), ref, atol=1e-6)
        if tuner in PEFT_NO_MERGE:
            with pytest.raises(MergeError, match="cannot be merged"):
                rlrr.merge(model)
            return
        merged = rlrr.merge(model)
    assert type(merged).__name__ == "VisionTransformer" and list(merged.state_dict()) == keys
    with torch.no_grad():
        assert rel(merged(x), ref) <= 1e-4
