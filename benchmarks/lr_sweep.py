"""Learning-rate sweep behind the mini suite's ``method_lr``: every method gets the same kind of grid,
picked on validation accuracy only (the test split is reported but never used to choose).

Each cell trains with the bench's own mini settings (protocol ``val``, 10 epochs, seed 0), so a chosen
rate is the one ``rlrr bench --suite mini`` then uses.  Cells are skipped when already done.

    python benchmarks/lr_sweep.py --task mnist --output runs/sweep
    python benchmarks/lr_sweep.py --grid lora:0.003,0.01,0.03 --grid ssf:0.01,0.03
"""
from __future__ import annotations

import argparse
from pathlib import Path

from rlrr.bench import run_cell, suite_cells

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="mnist", help="offline task to pick on (its val split)")
    ap.add_argument("--grid", action="append", default=[], help="METHOD:LR,LR,... (default: GRID above)")
    ap.add_argument("--output", type=Path, default=Path("runs/sweep"))
    args = ap.parse_args()
    grid = parse_grid(args.grid) if args.grid else GRID
    _, model, settings = suite_cells("mini", None, smoke=False)
    lines = ["| method | lr → val / test top-1 (%) | picked |", "|---|---|---|"]
    for method, lrs in grid.items():
        results = {}
        for lr in lrs:
            res = run_cell(args.output / args.task / method / f"lr{lr:g}", f"{method} lr {lr:g}", model,
                           "pretrained", f"offline:{args.task}", method, seed=0, lr=lr, **settings)
            results[lr] = (res["val_acc"], res["test_acc"])
        best = max(lrs, key=lambda lr: results[lr][0])  # ties go to the first (smaller) rate
        cells = ", ".join(f"{lr:g} → {v:.1f} / {t:.1f}" for lr, (v, t) in results.items())
        lines.append(f"| {method} | {cells} | {best:g} |")
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
