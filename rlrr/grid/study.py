"""``rlrr bench --study NAME``: the paper's ablations of RLRR's design, each a list of table rows (label,
method, options of the one RLRR method) run as bench cells on any suite, resumable like the bench,
with the paper's published rows printed beside the measured ones.

A row shared by several studies (RLRR's defaults) is one cell folder (``<out>/<task>/rlrr/seed<k>``),
the same one ``rlrr bench`` writes, so studies run into one output folder reuse it.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from .bench import run_grid, score_agreement, suite_cells, write_results
from .cells import Row
from ..files import figure, save_figure
from .launch import Launcher
from .published import study_markdown

STUDIES = {
    "scalings": "Table 6: left / right / both scalings, each without and with the residual W",
    "init": "Supp. Table 10: how the scaling vectors start",
    "additive": "Supp. Table 11: the additive W + s_l s_rᵀ ('w/o W') against RLRR and LoRA r=16",
    "rank": "Supp. Table 12: RLRR at rank 1 and 10 beside full fine-tuning and the linear probe",
    "sites": "Fig. 2: each insertion site alone and all three, and the adapted depth (first k blocks)",
}
RLRR = Row("RLRR", "rlrr")


def study_rows(name: str, depth: int = 0) -> list[Row]:
    """The rows of study ``name``; ``depth`` (the backbone's block count) sizes the sites study's depth rows."""
    if name == "scalings":
        return [Row("left", "rlrr", {"scales": "left", "residual": False}),
                Row("right", "rlrr", {"scales": "right", "residual": False}),
                Row("both", "rlrr", {"residual": False}),
                Row("left + W", "rlrr", {"scales": "left"}), Row("right + W", "rlrr", {"scales": "right"}),
                Row("both + W (RLRR)", "rlrr")]
    if name == "init":
        return [Row(i, "rlrr", {"init": i}) for i in ("normal", "zero", "constant", "uniform")] + \
            [Row("official (RLRR)", "rlrr")]
    if name == "additive":
        # the official init adds a random rank-1 matrix several times W's size; the paper does not say how its
        # "w/o W" started, so it also runs from W' = W (s_l = 0, as LoRA starts B = 0)
        return [Row("w/o W (additive)", "rlrr", {"form": "additive"}),
                Row("w/o W, s_l = 0 start", "rlrr", {"form": "additive", "init": "identity"}),
                Row("w/ W (RLRR)", "rlrr"), Row("LoRA r=16", "lora", {"rank": 16, "alpha": 16.0})]
    if name == "rank":
        return [Row("full", "full"), Row("linear", "linear"), Row("RLRR r=1", "rlrr"),
                Row("RLRR r=10", "rlrr", {"rank": 10})]
    if name == "sites":
        return [Row(s, "rlrr", {"sites": s}) for s in ("attn", "mlp", "norm")] + [Row("all (RLRR)", "rlrr")] + \
            [Row(f"depth {k}", "rlrr", {"blocks": f"first:{k}"}) for k in range(1, depth)]
    raise ValueError(f"unknown study {name!r}; choose one of {', '.join(STUDIES)}")


def block_count(model: str) -> int:
    from ..backbones import create_backbone
    from ..backbones.discover import discover
    return len(discover(create_backbone(model, weights=None)).blocks)


def run_study(name: str, suite: str, seeds: list[int], out: Path, root: str | None = None, model: str | None = None,
              weights: str | None = None, smoke: bool = False, launcher: Launcher | None = None,
              **overrides) -> list[dict]:
    """Run study ``name`` on ``suite``; writes ``study_<name>.{csv,md,png}`` (and the accuracy-vs-parameters
    PNG) into ``out``."""
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; choose one of {', '.join(STUDIES)}")
    _, suite_model, _ = suite_cells(suite, root, smoke)
    backbone = model or suite_model
    rows = study_rows(name, block_count(backbone) if name == "sites" else 0)
    results = run_grid(suite, rows, seeds, out, root, model, weights, smoke, launcher, **overrides)
    table, source = study_markdown(name)
    published = (f"Study '{name}' — {STUDIES[name]} — on {suite} with {backbone}."
                 + (" The paper used ResNet-18/50 on CIFAR-100; run `--model resnet50` on a suite for that."
                    if name == "rank" and "resnet" not in backbone else ""))
    if table:
        published += (f"\n\nPublished (not run here; {source}; another backbone and suite, so compare the order "
                      f"of the rows, not the numbers):\n\n{table}")
    write_results(results, out, suite, f"study_{name}", published)
    score_agreement(out, results, study=name)
    plot_study(name, results, out / f"study_{name}.png")
    return results


def seed_means(results: list[dict], label: str) -> list[float]:
    """A row's mean over tasks, per seed."""
    mine = [r for r in results if r["method"] == label]
    return [statistics.fmean(r["test_acc"] for r in mine if r["seed"] == s) for s in sorted({r["seed"] for r in mine})]


def plot_study(name: str, results: list[dict], path: Path) -> None:
    """Mean top-1 per row (± std over seeds); the sites study as Fig. 2: sites as bars, depth as a curve."""
    labels = list(dict.fromkeys(r["method"] for r in results))
    stats = {lb: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0)
             for lb in labels for v in [seed_means(results, lb)]}
    depth = [lb for lb in labels if lb.startswith("depth ")]
    bars = [lb for lb in labels if lb not in depth]
    fig, axes = figure(1, 2 if depth else 1, figsize=(10 if depth else 6, 4), squeeze=False)
    ax = axes[0][0]
    ax.bar(range(len(bars)), [stats[b][0] for b in bars], yerr=[stats[b][1] for b in bars], capsize=3)
    ax.set_xticks(range(len(bars)), bars, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="mean top-1 (%)", title=f"{name}: {STUDIES[name].split(':')[0]}")
    low = min(stats[b][0] - stats[b][1] for b in bars)
    ax.set_ylim(max(0.0, low - 5), None)
    if depth:
        ks = [int(lb.split()[1]) for lb in depth] + [len(depth) + 1]
        ys = [stats[lb] for lb in depth] + [stats["all (RLRR)"]]
        axes[0][1].errorbar(ks, [m for m, _ in ys], yerr=[s for _, s in ys], marker="o", capsize=3)
        axes[0][1].set(xlabel="adapted blocks (the first k)", ylabel="mean top-1 (%)", title="adapted depth")
        axes[0][1].grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
