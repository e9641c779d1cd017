"""Learning-rate sweep behind the mini suite's ``method_lr``: every method gets the same kind of grid,
picked on validation accuracy only (the test split is reported but never used to choose).

Each cell trains with the bench's own mini settings (protocol ``val``, 10 epochs, seed 0), so a chosen
rate is the one ``rlrr bench --suite mini`` then uses.  Cells are skipped when already done.

    python benchmarks/lr_sweep.py --task mnist --output runs/sweep
    python benchmarks/lr_sweep.py --grid lora:0.003,0.01,0.03 --grid ssf:0.01,0.03
    python benchmarks/lr_sweep.py --grid rlrr+pace:0.02,0.06 --opts rlrr+pace:sigma=0.1 --opts rlrr+pace:sigma=0.3

``--opts METHOD:key=value,...`` adds one option set of that method to the sweep: each rate of its grid
runs with each set given (without any: the options the task config gives it, or its defaults).  The
picks go into the task config as ``method_lr`` and ``method_opts``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from rlrr.bench import run_cell, suite_cells
from rlrr.cli import method_options

# lr/3, lr, 3·lr around each paper's range, widened by one step where the best sat at an edge.
GRID = {
    "linear": (0.03, 0.1, 0.3),
    "full": (3e-4, 1e-3, 3e-3),
    "bitfit": (0.01, 0.03, 0.1),
    "ssf": (0.003, 0.01, 0.03, 0.1),
    "lora": (0.003, 0.01, 0.03),
    "adapter": (0.003, 0.01, 0.03, 0.1),
    "vpt": (0.01, 0.03, 0.1, 0.3),
    "rlrr": (0.02, 0.06, 0.18),
    "rlrr+pace": (0.02, 0.06, 0.18),
    "hta": (0.003, 0.01, 0.03),
    "apla": (0.001, 0.003, 0.01),
    "peft:vera": (0.01, 0.03, 0.1),
    "peft:ia3": (0.01, 0.03, 0.1),
    "peft:lokr": (0.003, 0.01, 0.03),
}


def parse_grid(specs: list[str]) -> dict[str, tuple[float, ...]]:
    grid = {}
    for spec in specs:
        method, _, lrs = spec.rpartition(":")  # method names may hold a colon (peft:vera)
        if not method or not lrs:
            raise SystemExit(f"--grid {spec!r}: write METHOD:LR,LR,... (e.g. lora:0.003,0.01)")
        grid[method] = tuple(float(v) for v in lrs.split(","))
    return grid


def parse_opts(specs: list[str]) -> dict[str, list[dict]]:
    variants: dict[str, list[dict]] = {}
    for spec in specs:
        method = spec.partition("=")[0].rpartition(":")[0]  # method names may hold a colon (peft:vera)
        if not method:
            raise SystemExit(f"--opts {spec!r}: write METHOD:KEY=VALUE,... (e.g. rlrr+pace:sigma=0.3,lambda=0.1)")
        variants.setdefault(method, []).append(method_options(spec[len(method) + 1:].split(",")))
    return variants


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="mnist", help="offline task to pick on (its val split)")
    ap.add_argument("--grid", action="append", default=[], help="METHOD:LR,LR,... (default: GRID above)")
    ap.add_argument("--opts", action="append", default=[], help="METHOD:KEY=VALUE,... one option set to sweep")
    ap.add_argument("--output", type=Path, default=Path("runs/sweep"))
    args = ap.parse_args()
    grid = parse_grid(args.grid) if args.grid else GRID
    variants = parse_opts(args.opts)
    _, model, settings = suite_cells("mini", None, smoke=False)
    lines = ["| method | options | lr → val / test top-1 (%) | picked |", "|---|---|---|---|"]
    for method, lrs in grid.items():
        results = {}
        for opts in variants.get(method, [{}]):
            name = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in opts.items())
            for lr in lrs:
                cell = args.output / args.task / method / (f"lr{lr:g}" + (f"-{name}" if name else ""))
                label = " ".join(filter(None, (method, name, f"lr {lr:g}")))
                res = run_cell(cell, label, model, "pretrained", f"offline:{args.task}", method, opts, seed=0,
                               lr=lr, **settings)
                results[name, lr] = (res["val_acc"], res["test_acc"])
            cells = ", ".join(f"{lr:g} → {v:.1f} / {t:.1f}" for (n, lr), (v, t) in results.items() if n == name)
            lines.append(f"| {method} | {name or 'as configured'} | {cells} | |")
        best = max(results, key=lambda k: results[k][0])  # ties go to the first (first option set, smaller rate)
        lines[-1] = lines[-1][:-2] + f" {best[0] or 'as configured'}, lr {best[1]:g} |"
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
