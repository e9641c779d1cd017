"""The paper's lens: what a fine-tuning method does to the pretrained weights ``W = U Σ Vᵀ``.

For every adapted matrix (the family's block linears; convs as ``out × in·k·k``) we compare the
pretrained ``W`` with the merged ``W'``:

* ``rel_change``      ‖W'−W‖_F / ‖W‖_F
* ``sv_ratio``        σ'_i / σ_i for the top-k singular values
* ``align_left/right`` ‖U_kᵀ U'_k‖_F² / k — 1 when the top-k singular subspaces are kept
* ``update_in_span``  share of ‖ΔW‖² inside span(U_k) ⊗ span(V_k) of the pretrained W — high when a
  method works in W's leading directions, low when it adds others; null for an unchanged matrix
* ``update_eff_rank`` entropy effective rank (Roy & Vetterli) of ΔW = W'−W; 0 for no change

Works for every mergeable method (RLRR, LoRA, SSF, BitFit, full fine-tuning).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from .adapter import Adapter, load_adapter
from .backbones import checkpoint_num_classes, create_backbone
from .backbones.discover import discover
from .files import atomic_write, figure, save_figure
from .methods.base import MergeError, merge


def effective_rank(m: torch.Tensor, rtol: float = 1e-5) -> float:
    """exp(entropy of the normalised singular values); values under ``rtol·σ_max`` are float32
    round-off of weights stored in fp32, not directions, and are dropped."""
    s = torch.linalg.svdvals(m.double())
    if s.numel() == 0 or s.max() <= 1e-12:
        return 0.0
    s = s[s > rtol * s.max()]
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def compare(w: torch.Tensor, w2: torch.Tensor, k: int = 8) -> dict[str, float | list[float]]:
    """All figures for one matrix pair (float64 for stable small differences)."""
    w, w2 = w.double().flatten(1), w2.double().flatten(1)
    k = min(k, *w.shape)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    u2, s2, vh2 = torch.linalg.svd(w2, full_matrices=False)
    delta = w2 - w
    uk, vk = u[:, :k], vh[:k].T
    dn = float(delta.norm()) ** 2
    in_span = float((uk.T @ delta @ vk).norm()) ** 2 / dn if dn > 0 else None  # undefined without change
    return {"rel_change": float(delta.norm() / w.norm()),
            "sv_ratio": (s2[:k] / s[:k]).tolist(),
            "align_left": float((uk.T @ u2[:, :k]).norm() ** 2 / k),
            "align_right": float((vk.T @ vh2[:k].T).norm() ** 2 / k),
            "update_in_span": in_span,
            "update_eff_rank": effective_rank(delta)}


def adapted_matrices(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The discovered block linears/convs of a plain (merged) model, by module name."""
    return {n: model.get_submodule(n).weight.detach().clone() for n in discover(model).targets}


def analyze(model_name: str, weights: str | None, adapters: list[str | Path], k: int = 8,
            progress: bool = True, check_fingerprint: bool = True) -> dict:
    results = {"model": model_name, "topk": k, "methods": {}}
    for path in adapters:
        adapter = Adapter.read(path)
        meta = adapter.meta
        model = create_backbone(model_name, weights=weights, num_classes=checkpoint_num_classes(model_name, adapter.tensors))
        before = adapted_matrices(model)  # the plain weights first, then the same model adapted
        model = load_adapter(model, adapter, check_fingerprint)
        try:
            after = adapted_matrices(merge(model))
        except MergeError as e:
            results["methods"][str(path)] = {"method": meta["method"], "skipped": str(e)}
            continue
        layers = {name: compare(before[name], after[name], k)
                  for name in tqdm(before, desc=f"svd {Path(path).name}", disable=not progress)}
        results["methods"][str(path)] = {"method": meta["method"], "layers": layers}
    return results


def plot(results: dict, out: Path) -> list[Path]:
    """Per-layer curves, one line per adapter, one panel per figure of merit."""
    panels = [("rel_change", "‖ΔW‖/‖W‖"), ("sv_top1", "σ'₁/σ₁"), ("align_left", "top-k left alignment"),
              ("update_in_span", "ΔW energy in pretrained top-k span"), ("update_eff_rank", "effective rank of ΔW")]
    fig, axes = figure(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for path, res in results["methods"].items():
        if "layers" not in res:
            continue
        names = list(res["layers"])
        for ax, (key, title) in zip(axes, panels):
            vals = [(r["sv_ratio"][0] if key == "sv_top1" else r[key]) for r in res["layers"].values()]
            vals = [float("nan") if v is None else v for v in vals]
            ax.plot(range(len(names)), vals, marker=".", label=f"{res['method']} ({Path(path).stem})")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("adapted matrix (model order)")
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{results['model']}: how each method changes the pretrained weights")
    fig.tight_layout()
    png = out / "svd_analysis.png"
    save_figure(fig, png)
    return [png]


def run_analysis(model_name: str, weights: str | None, adapters: list[str], out: Path, k: int = 8,
                 check_fingerprint: bool = True) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    res = analyze(model_name, weights, adapters, k, check_fingerprint=check_fingerprint)
    atomic_write(out / "svd_analysis.json", lambda f: f.write(json.dumps(res, indent=1)), "w")
    plot(res, out)
    for path, r in res["methods"].items():
        if "layers" in r:
            layers = list(r["layers"].values())
            changed = [x for x in layers if x["rel_change"] > 0]

            def mean(key: str, rows: list = layers) -> str:
                vals = [x[key] for x in rows if x[key] is not None]
                return f"{sum(vals) / len(vals):.3f}" if vals else "n/a"
            print(f"{r['method']:<8} {path}: mean ‖ΔW‖/‖W‖ {mean('rel_change')}, top-k alignment "
                  f"{mean('align_left')}; over the {len(changed)}/{len(layers)} changed matrices: ΔW in top-k span "
                  f"{mean('update_in_span', changed)}, eff. rank(ΔW) {mean('update_eff_rank', changed)}")
        else:
            print(f"{r['method']:<8} {Path(path).name}: skipped ({r['skipped']})")
    return res
