"""SVD analysis on constructed cases whose answers are known, and end to end on adapters."""
import json

import pytest
import torch

import rlrr
from rlrr.analysis import compare, effective_rank, run_analysis


def test_pure_rescaling_keeps_singular_directions():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(32, 32))
    v, _ = torch.linalg.qr(torch.randn(16, 16))
    s = torch.linspace(4, 0.5, 16)
    w = u[:, :16] @ torch.diag(s) @ v.T
    w2 = u[:, :16] @ torch.diag(s * torch.linspace(1.5, 1.1, 16)) @ v.T  # rescale every singular value
    r = compare(w, w2, k=4)
    assert r["align_left"] == pytest.approx(1, abs=1e-6) and r["align_right"] == pytest.approx(1, abs=1e-6)
    assert r["sv_ratio"][0] == pytest.approx(1.5, abs=1e-6)
    assert r["update_eff_rank"] > 2  # a full-rank update, but entirely along W's own directions
    r8 = compare(w, u[:, :16] @ torch.diag(s * torch.tensor([1.5] * 4 + [1.0] * 12)) @ v.T, k=4)
    assert r8["update_in_span"] == pytest.approx(1, abs=1e-9)  # only the top-4 directions were touched


def test_random_rank1_lora_update_is_a_new_direction():
    torch.manual_seed(0)
    w = torch.randn(64, 48)
    b, a = torch.randn(64, 1), torch.randn(1, 48)
    r = compare(w, w + 0.5 * b @ a, k=4)
    assert r["update_eff_rank"] == pytest.approx(1, abs=1e-6)
    assert r["update_in_span"] < 0.2  # mostly outside W's top-4 singular subspace


def test_identity_adapter_changes_nothing():
    w = torch.randn(20, 10)
    r = compare(w, w.clone())
    assert r["rel_change"] == 0 and r["update_eff_rank"] == 0 and effective_rank(torch.zeros(3, 3)) == 0
    assert all(x == pytest.approx(1) for x in r["sv_ratio"])


def test_analyze_cli_path_compares_methods(tmp_path):
    torch.manual_seed(0)
    base = rlrr.create_backbone("vit_pico_patch4_32", weights=None, num_classes=4)
    from safetensors.torch import save_file
    save_file(base.state_dict(), str(tmp_path / "base.safetensors"))
    paths = []
    for name, cfg in (("rlrr", {"init": "identity"}), ("lora", {}), ("adapter", {})):
        m = rlrr.create_backbone("vit_pico_patch4_32", weights=tmp_path / "base.safetensors", num_classes=4)
        m = rlrr.apply(m, rlrr.make_config(name, **cfg))
        with torch.no_grad():
            for n, p in rlrr.trainable_parameters(m):
                if "lora_B" in n or "scale_l" in n:
                    p.normal_(0, 0.1)
        paths.append(str(rlrr.save_adapter(m, tmp_path / f"{name}.safetensors")))
    res = run_analysis("vit_pico_patch4_32", str(tmp_path / "base.safetensors"), paths, tmp_path / "out", k=4)
    saved = json.loads((tmp_path / "out" / "svd_analysis.json").read_text())
    base_w = base.state_dict()["blocks.0.attn.qkv.weight"]
    merged = rlrr.merge(rlrr.load_adapter(rlrr.create_backbone("vit_pico_patch4_32", weights=tmp_path / "base.safetensors",
                                                               num_classes=4), paths[0]))
    moved = float((merged.state_dict()["blocks.0.attn.qkv.weight"] - base_w).norm() / base_w.norm())
    saved_rlrr = next(r for r in saved["methods"].values() if r["method"] == "rlrr")  # the file, against W' - W itself
    assert moved > 0.01 and saved_rlrr["layers"]["blocks.0.attn.qkv"]["rel_change"] == pytest.approx(moved, rel=1e-3)
    by = {r["method"]: r for r in res["methods"].values()}
    lora_q = by["lora"]["layers"]["blocks.0.attn.qkv"]
    assert lora_q["update_eff_rank"] <= 16.5  # two rank-8 slices
    assert by["lora"]["layers"]["blocks.0.mlp.fc1"]["rel_change"] == 0  # LoRA does not touch fc1
    rl = by["rlrr"]["layers"]["blocks.0.mlp.fc1"]
    assert rl["rel_change"] > 0 and rl["update_in_span"] > lora_q["update_in_span"]
    assert "cannot be merged" in by["adapter"]["skipped"]
    assert (tmp_path / "out" / "svd_analysis.png").stat().st_size > 1000
