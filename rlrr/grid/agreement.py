"""How far a benchmark's verdicts can be trusted: agreement of its method ranking with the published
VTAB-1k one (``rlrr/configs/published/vtab1k.csv``, plain 19-task means, the RLRR paper's own table first).

A proxy suite is an instrument; its figure of merit is whether it orders the methods as the paper-scale
table does.  For every method of a results table that has a published row: Spearman's ρ (average ranks
for ties), Kendall's τ-b, the fraction of method pairs ordered as published (a pair tied here counts
half), and a bootstrap interval of ρ over seeds (seeds drawn with replacement, the same draw for every
method).  Fewer than 3 matched methods: no correlation (said, not guessed).
"""
from __future__ import annotations

import math
import random
import statistics
from itertools import combinations

# our method name -> the published row it is compared with (the first row of that name in the CSV: the
# RLRR paper's Table 1 for all but HTA, whose own paper gives it under the same protocol)
PUBLISHED_NAME = {"full": "Full fine-tuning", "linear": "Linear probing", "bitfit": "Bias (BitFit)",
                  "vpt": "VPT-Deep", "lora": "LoRA", "adapter": "AdaptFormer", "ssf": "SSF*", "rlrr": "RLRR",
                  "hta": "HTA"}


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing the mean of the ranks they span."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's ρ: Pearson's correlation of the ranks; None for fewer than 3 values or a constant side."""
    if len(x) < 3:
        return None
    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx and syy else None


def kendall_tau_b(x: list[float], y: list[float]) -> float | None:
    """Kendall's τ-b (tie-corrected); None for fewer than 3 values or a constant side."""
    if len(x) < 3:
        return None
    conc = disc = tx = ty = 0
    for i, j in combinations(range(len(x)), 2):
        dx, dy = x[i] - x[j], y[i] - y[j]
        if dx == 0 and dy == 0:
            continue
        if dx == 0:
            tx += 1
        elif dy == 0:
            ty += 1
        elif (dx > 0) == (dy > 0):
            conc += 1
        else:
            disc += 1
    denom = math.sqrt((conc + disc + tx) * (conc + disc + ty))
    return (conc - disc) / denom if denom else None


def pairs_in_order(ours: list[float], published: list[float]) -> float | None:
    """The fraction of method pairs ordered as published (pairs tied in the published table left out; a
    pair tied here counts half); None when no pair is ordered in the published table."""
    score = n = 0.0
    for i, j in combinations(range(len(ours)), 2):
        dp, do = published[i] - published[j], ours[i] - ours[j]
        if dp == 0:
            continue
        n += 1
        score += 0.5 if do == 0 else float((do > 0) == (dp > 0))
    return score / n if n else None


def method_seed_means(rows: list[dict]) -> dict[str, dict[int, float]]:
    """Each method's plain mean over tasks, per seed (the table's 'mean' column before averaging seeds)."""
    cells: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        cells.setdefault(r["method"], {}).setdefault(int(r["seed"]), []).append(float(r["test_acc"]))
    return {m: {s: statistics.fmean(v) for s, v in per.items()} for m, per in cells.items()}


def vtab_published() -> dict[str, float]:
    """Published name -> plain 19-task mean, the first row of each name (the RLRR paper's table first)."""
    from .published import load
    published: dict[str, float] = {}
    for r in load("vtab1k"):
        published.setdefault(r["method"], r["plain"])
    return published


def study_published(name: str) -> dict[str, float]:
    """A study's published rows (``study_<name>.csv``) as row label -> one score: the mean the table prints
    (Table 6, FGVC), else the mean of its VTAB-1k group means (Supp. Tables 10-11), else ResNet-50 on
    CIFAR-100 (Supp. Table 12); {} where the paper gives a plot, not numbers (Fig. 2)."""
    from .published import study_table
    rows = study_table(name)
    if not rows:
        return {}
    groups = ("natural", "specialized", "structured")
    score = (lambda r: float(r["mean"])) if "mean" in rows[0] else \
        (lambda r: statistics.fmean(float(r[g]) for g in groups)) if "natural" in rows[0] else \
        (lambda r: float(r["resnet50_cifar100"]))
    return {r["row"]: score(r) for r in rows}


def agreement(rows: list[dict], published: dict[str, float] | None = None, names: dict[str, str] | None = None,
              draws: int = 1000) -> dict:
    """Agreement of ``rows`` (task, method, seed, test_acc) with ``published`` (published name -> score;
    default: the VTAB-1k table's plain means), our names matched through ``names`` (default
    ``PUBLISHED_NAME``; a study's row labels are the published ones); see the module docstring."""
    published = vtab_published() if published is None else published
    names = PUBLISHED_NAME if names is None else names
    per_seed = method_seed_means(rows)
    matched = [m for m in per_seed if names.get(m) in published]
    result = {"methods": [{"method": m, "published_as": names[m], "mean": statistics.fmean(per_seed[m].values()),
                           "published": published[names[m]]} for m in matched],
              "unmatched": [m for m in per_seed if m not in matched]}
    ours = [x["mean"] for x in result["methods"]]
    pub = [x["published"] for x in result["methods"]]
    result.update(n=len(matched), spearman=spearman(ours, pub), kendall=kendall_tau_b(ours, pub),
                  pairs=pairs_in_order(ours, pub), interval=None)
    seeds = sorted(set.intersection(*(set(per_seed[m]) for m in matched))) if matched else []
    if len(seeds) > 1 and result["spearman"] is not None:
        rng, rhos = random.Random(0), []
        for _ in range(draws):
            draw = [rng.choice(seeds) for _ in seeds]
            rho = spearman([statistics.fmean(per_seed[m][s] for s in draw) for m in matched], pub)
            if rho is not None:
                rhos.append(rho)
        rhos.sort()
        result["interval"] = (rhos[int(0.025 * (len(rhos) - 1))], rhos[int(0.975 * (len(rhos) - 1))])
    result["seeds"] = seeds
    return result


def markdown(result: dict, against: str = "the published VTAB-1k ranking", unit: str = "methods") -> str:
    """A few lines under a table: the figures, the interval, and what was left out."""
    fmt = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
    if result["n"] < 3:
        head = (f"Agreement with {against}: not computed ({result['n']} {unit} with a published "
                "row; 3 or more are needed).")
    else:
        ci = result["interval"]
        head = (f"Agreement with {against} over {result['n']} {unit}: Spearman ρ "
                f"{fmt(result['spearman'])}" + (f" (95% bootstrap over seeds {fmt(ci[0])} to {fmt(ci[1])})" if ci else
                                                 " (one seed: no interval)")
                + f", Kendall τ-b {fmt(result['kendall'])}, pairs ordered as published {fmt(result['pairs'])}.")
    lines = [head]
    if result["methods"]:
        lines.append("; ".join(f"{x['method']} {x['mean']:.1f} (published {x['published_as']} {x['published']:.1f})"
                               for x in sorted(result["methods"], key=lambda x: -x["mean"])) + ".")
    if result["unmatched"]:
        lines.append(f"No published row: {', '.join(result['unmatched'])}.")
    return "\n".join(lines)
