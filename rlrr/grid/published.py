"""Published VTAB-1k and FGVC results as data (``rlrr/configs/published/*.csv``), every row with its source.

Papers average VTAB-1k two ways: RLRR and HTA print the plain mean of the 19 tasks (RLRR: 74.5),
PACE and NOAH-style tables the mean of the three group means (the same RLRR row: 76.7 as PACE prints
it, 76.75 from the cells).  Both are recomputed here from the per-task cells, so a printed table and
``rlrr bench``'s output cannot disagree; the value each paper printed is kept beside them.
"""
from __future__ import annotations

import csv
import statistics

from ..config import CONFIG_DIR
from ..data.benchmarks import FGVC, VTAB
from ..files import markdown_table

PUBLISHED_DIR = CONFIG_DIR / "published"


def load(suite: str) -> list[dict]:
    """Rows of ``rlrr/configs/published/<suite>.csv``: method, backbone, params_m, source, printed mean and
    per-task top-1 (floats), plus ``plain`` (task mean) and, for VTAB-1k, ``groups`` (mean of group means)."""
    path = PUBLISHED_DIR / f"{suite}.csv"
    if not path.is_file():
        if suite in ("vtab1k", "fgvc"):  # the package ships both: their absence is a broken install
            raise FileNotFoundError(f"{path} (published results) is missing from the installed rlrr; reinstall it")
        return []
    tasks = list(VTAB) if suite == "vtab1k" else list(FGVC)
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            acc = {t: float(r[t]) for t in tasks}
            row = {**r, "tasks": acc, "plain": statistics.fmean(acc.values())}
            if suite == "vtab1k":
                row["group_means"] = {g: statistics.fmean(v for t, v in acc.items() if VTAB[t][1] == g)
                                      for g in ("natural", "specialized", "structured")}
                row["groups"] = statistics.fmean(row["group_means"].values())
            rows.append(row)
    return rows


def markdown(suite: str) -> str:
    """The published rows as a markdown table (both means for VTAB-1k), labelled as published."""
    rows = load(suite)
    if not rows:
        return ""
    tasks = list(rows[0]["tasks"])
    vtab = suite == "vtab1k"
    head = ["published method", "backbone", "params (M)", *tasks,
            *(["natural", "specialized", "structured", "plain mean", "mean of groups"] if vtab else ["mean"]),
            "printed", "source"]
    cells = []
    for r in rows:
        means = [*(f"{v:.1f}" for v in r["group_means"].values()), f"{r['plain']:.2f}", f"{r['groups']:.2f}"] \
            if vtab else [f"{r['plain']:.2f}"]
        printed = f"{r['printed_mean']} ({r['printed_mean_convention']})" if vtab else r["printed_mean"]
        cells.append([r["method"], r["backbone"], r["params_m"] or "—", *(f"{r['tasks'][t]:.1f}" for t in tasks),
                      *means, printed, r["source"]])
    return markdown_table(head, cells)


def main() -> None:
    for suite in ("vtab1k", "fgvc"):
        print(f"\n{suite} (published, not run here)\n\n{markdown(suite)}")


if __name__ == "__main__":
    main()


def study_table(name: str) -> list[dict]:
    """A study's published rows (``rlrr/configs/published/study_<name>.csv``) as read; [] when the paper has
    no numbers for it (Fig. 2 is a plot)."""
    path = PUBLISHED_DIR / f"study_{name}.csv"
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def study_markdown(name: str) -> tuple[str, str]:
    """A study's published table as markdown, and its source; ('', '') when it has none."""
    rows = study_table(name)
    if not rows:
        return "", ""
    head = [k for k in rows[0] if k != "source"]
    return markdown_table(head, [[r[k] for k in head] for r in rows]), "; ".join(dict.fromkeys(r["source"] for r in rows))
