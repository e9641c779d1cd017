"""Record one lever of the proxy suite's calibration (issue 26) from a finished bench folder, and print the
table of every lever recorded so far.

A lever is one change to the proxy (training images, tasks, tuning, epochs, backbone) measured by how the
bench's method ranking agrees with the published VTAB-1k one (``rlrr.grid.agreement``).  This script trains
nothing: it reads ``<output>/results.csv`` and ``agreement.json`` (what ``rlrr bench`` wrote), adds up the
training time its cells and tuning trials took (on the CPU, or the device ``--device`` names), appends one row
to ``benchmarks/results/proxy_levers.jsonl`` and copies the per-cell rows to ``benchmarks/results/<name>.csv``
(each with its rate, commit and rerun line).

    python benchmarks/proxy_levers.py --output runs/lever --name proxy_n200_tuned \
        --lever "200 images, fractal task, rate tuned per task" --command "rlrr bench --suite proxy ..."
    python benchmarks/proxy_levers.py --table        # the levers recorded so far, as markdown
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
from pathlib import Path

from rlrr.files import markdown_table
from rlrr.version import code_commit

RESULTS = Path(__file__).parent / "results"
LEVERS = RESULTS / "proxy_levers.jsonl"


def cpu_seconds(out: Path) -> float:
    """Training time of every run under ``out``: cells and tuning trials (summary.json's train_wall_s)."""
    return sum(json.loads(p.read_text()).get("train_wall_s", 0.0) for p in out.rglob("summary.json"))


def record(out: Path, name: str, lever: str, command: str, device: str = "cpu") -> dict:
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    agreement = json.loads((out / "agreement.json").read_text())
    means = {m: statistics.fmean(float(r["test_acc"]) for r in rows if r["method"] == m)
             for m in dict.fromkeys(r["method"] for r in rows)}
    row = {"name": name, "lever": lever, "command": command, "tasks": sorted({r["task"] for r in rows}),
           "seeds": sorted({int(r["seed"]) for r in rows}), "epochs": sorted({int(r["epochs"]) for r in rows}),
           "methods": len(means), "cells": len(rows), "cpu_minutes": round(cpu_seconds(out) / 60, 1), "device": device,
           "spearman": agreement["spearman"], "kendall_tau_b": agreement["kendall"], "pairs_in_order": agreement["pairs"],
           "interval": agreement["interval"],
           "means": {m: round(v, 2) for m, v in means.items()}, "code": code_commit()}
    RESULTS.mkdir(exist_ok=True)
    kept = [json.loads(line) for line in LEVERS.read_text().splitlines()] if LEVERS.is_file() else []
    kept = [k for k in kept if k["name"] != name] + [row]
    LEVERS.write_text("".join(json.dumps(k) + "\n" for k in kept))
    shutil.copyfile(out / "results.csv", RESULTS / f"{name}.csv")
    return row


def task_subsets(out: Path) -> str:
    """The task-set lever measured for free: the agreement of every subset of a finished bench's tasks, from
    the same cells (no training).  Read it as a measurement, not a menu: picking the subset with the best ρ
    fits nine published numbers, not a phenomenon."""
    from itertools import combinations
    from rlrr.grid.agreement import agreement
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        rows = [{**r, "test_acc": float(r["test_acc"]), "seed": int(r["seed"])} for r in csv.DictReader(f)]
    tasks = sorted({r["task"] for r in rows})
    fmt = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
    lines = []
    for k in range(1, len(tasks) + 1):
        for keep in combinations(tasks, k):
            a = agreement([r for r in rows if r["task"] in keep])
            lines.append([", ".join(keep), fmt(a["spearman"]), fmt(a["kendall"]), fmt(a["pairs"])])
    return markdown_table(["tasks", "Spearman ρ", "Kendall τ-b", "pairs in order"], lines)


def table() -> str:
    kept = [json.loads(line) for line in LEVERS.read_text().splitlines()]
    fmt = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
    return markdown_table(["lever", "tasks", "seeds", "cells", "training min (where)", "Spearman ρ (95% over seeds)",
                           "Kendall τ-b", "pairs in order"],
                          [[k["lever"], ", ".join(k["tasks"]), len(k["seeds"]), k["cells"],
                            "—" if k["cpu_minutes"] is None else f"{k['cpu_minutes']} ({k.get('device', 'cpu')})",
                            fmt(k["spearman"]) + (f" ({fmt(k['interval'][0])} to {fmt(k['interval'][1])})"
                                                  if k.get("interval") else ""),
                            fmt(k["kendall_tau_b"]), fmt(k["pairs_in_order"])] for k in kept])


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", type=Path, help="a finished bench folder")
    p.add_argument("--name", help="the lever's short name (the CSV's name under benchmarks/results/)")
    p.add_argument("--lever", help="what was changed, in words")
    p.add_argument("--command", help="the bench command that made the folder")
    p.add_argument("--device", default="cpu", help="where its cells trained (cpu: the 2-core machine; or e.g. 'H200')")
    p.add_argument("--table", action="store_true", help="print the recorded levers as markdown")
    p.add_argument("--subsets", action="store_true", help="with --output: the agreement of every subset of its tasks")
    a = p.parse_args()
    if a.output and a.subsets:
        print(task_subsets(a.output))
    elif a.output:
        print(json.dumps(record(a.output, a.name, a.lever, a.command, a.device), indent=1))
    if a.table:
        print(table())
