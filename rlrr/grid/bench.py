"""``rlrr bench``: every task × method × seed through the same harness, resumable, summarised in
the paper's table shape (per-task top-1, group means, mean, trainable params) and a PNG of
accuracy vs trainable parameters.

Cells live in ``<out>/<task>/<method>/seed<k>/``; a cell with ``summary.json`` is done and skipped,
an unfinished one resumes from its checkpoint, so a killed bench just runs again.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from ..backbones import EMBEDDED_NAME
from ..data.benchmarks import FGVC, VTAB
from ..data.offline import parse_task
from ..files import atomic_write, figure, save_figure, write_csv
from ..files import markdown_table as table
from .cells import Row, cell_command, run_cell
from .launch import Launcher, launch
from .published import markdown as markdown_published
from .sweep import tune_row

MINI_TASKS = ("mnist", "dsprites_ori", "clevr_count")
# The proxy suite (issue 26): the tasks on 100 training images, the backbone pre-trained at FractalDB-1k scale,
# each method's rate chosen per task on the mean val of two seeds (lr/10, lr/3, lr, 3·lr around its own): the
# levers that raised its agreement with VTAB-1k (BENCHMARKS.md, "The proxy suite").
PROXY_TASKS, PROXY_IMAGES = ("mnist", "fractal", "dsprites_ori", "clevr_count"), 100
PROXY = {"tune": {"lr": ["x0.1", "x0.33", "x1", "x3"]}, "tune_seeds": 2, "weights": "pretrained:fractal1k"}
MINI_GROUP = {"mnist": "natural", "digits": "natural", "fractal": "natural", "dsprites_loc": "structured",
              "dsprites_ori": "structured", "clevr_count": "structured"}


def suite_cells(suite: str, root: str | None, smoke: bool) -> tuple[list[tuple[str, str, str]], str, dict]:
    """(task name, group, data spec) per task, the suite's backbone, and the training settings it fixes (the
    proxy suite's tuning and backbone weights among them)."""
    if suite in ("mini", "proxy") or suite.startswith("offline:"):  # or a list of specs: offline:mnist:200,...
        specs = {"mini": [f"offline:{t}" for t in MINI_TASKS],
                 "proxy": [f"offline:{t}:{PROXY_IMAGES}" for t in PROXY_TASKS]}.get(suite) or suite.split(",")
        cells = []
        for spec in specs[:1] if smoke else specs:
            kind, _, where = spec.partition(":")
            if kind != "offline":
                raise ValueError(f"--suite {suite}: {spec!r} is not an offline task; a suite of tasks is a "
                                 "comma-separated list of offline:TASK[:N]")
            task, n = parse_task(where)
            cells.append((task if n == 800 else f"{task}@{n}", MINI_GROUP[task], spec))
        settings = {"protocol": "val", "epochs": 1 if smoke else 10, "warmup_epochs": 0 if smoke else 1,
                    **(PROXY if suite == "proxy" else {})}
        return cells, EMBEDDED_NAME, settings
    if root is None:
        raise ValueError(f"--suite {suite} needs --root (the folder holding the {suite} task folders)")
    if suite == "vtab1k":
        cells = [(t, g, f"vtab1k:{root}/{t}") for t, (_, g) in VTAB.items()]
    elif suite == "fgvc":
        cells = [(t, "fgvc", f"fgvc:{root}/{t}") for t in FGVC]
    else:
        raise ValueError(f"unknown suite {suite!r}; use mini, proxy, vtab1k, fgvc or a list of offline:TASK[:N]")
    return cells, "vit_base_patch16_224", {}


def run_bench(suite: str, methods: list[str], seeds: list[int], out: Path, root: str | None = None,
              model: str | None = None, weights: str | None = None, smoke: bool = False,
              launcher: Launcher | None = None, **overrides) -> list[dict]:
    rows = run_grid(suite, [Row(m, m) for m in methods], seeds, out, root, model, weights, smoke, launcher, **overrides)
    write_results(rows, out, suite)
    score_agreement(out, rows)
    return rows


def score_agreement(out: Path, rows: list[dict] | None = None, study: str | None = None) -> dict:
    """The agreement of a bench's method ranking with the published VTAB-1k one (``rlrr.grid.agreement``), or of a
    study's row order with its published table, printed and written beside its table (``agreement.md/json``,
    ``study_<name>_agreement.md/json``); without ``rows``, read from ``out/results.csv``, so a finished bench
    is scored again without training."""
    from .agreement import agreement, markdown, study_published
    if rows is None:
        import csv
        table = out / ("results.csv" if study is None else f"study_{study}.csv")
        if not table.is_file():
            raise FileNotFoundError(f"{table} not found; --agreement-only scores a finished bench's (or --study's) "
                                    "results folder: pass its --output")
        with open(table, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    if study is None:
        result = agreement(rows)
        text, name = markdown(result), "agreement"
    else:
        published = study_published(study)
        result = agreement(rows, published, names={label: label for label in published})
        text = markdown(result, f"the paper's row order for the {study} study", "rows")
        name = f"study_{study}_agreement"
    atomic_write(out / f"{name}.md", lambda f: f.write(text + "\n"), "w")
    atomic_write(out / f"{name}.json", lambda f: f.write(json.dumps(result, indent=1)), "w")
    print(f"\n{text}")
    return result


def run_grid(suite: str, rows: list[Row], seeds: list[int], out: Path, root: str | None = None,
             model: str | None = None, weights: str | None = None, smoke: bool = False,
             launcher: Launcher | None = None, tune: dict[str, list] | None = None, tune_seeds: int | None = None,
             **overrides) -> list[dict]:
    """Every task × row × seed cell of ``suite`` (``smoke``: one task, one epoch, the first seed), run where
    ``launcher`` says, then read back from the cell folders into one result row per cell.  ``tune`` (a grid,
    ``sweep.parse_grid(relative=True)``) first chooses each (task, row)'s setting on val with a sweep
    (``<task>/<row>_tuned/tune/``; test is never read) scored on the mean val of the first ``tune_seeds``
    seeds (the suite's own number, at most as many as are run, unless given), then runs that row's cells with it."""
    cells, suite_model, settings = suite_cells(suite, root, smoke)
    suite_tune, suite_seeds, suite_weights = (settings.pop(k, None) for k in ("tune", "tune_seeds", "weights"))
    tune = tune or suite_tune  # the suite's own (the proxy's), unless --tune says otherwise
    tune_seeds = tune_seeds or min(suite_seeds or 1, len(seeds))
    if tune_seeds > 1 and not tune:
        raise ValueError(f"--tune-seeds {tune_seeds} scores a tuning over seeds, and nothing is tuned; add --tune "
                         "KEY=V1,V2,... (or use --suite proxy)")
    if tune_seeds > len(seeds):
        raise ValueError(f"--tune-seeds {tune_seeds} tunes on the first {tune_seeds} of --seeds, which has "
                         f"{len(seeds)}; give more seeds or a smaller --tune-seeds")
    seeds, tune_seeds = (seeds[:1], 1) if smoke else (seeds, tune_seeds)
    settings = {**settings, **{k: v for k, v in overrides.items() if v is not None}}
    weights = weights or (suite_weights if model in (None, suite_model) else None) or "pretrained"
    model = model or suite_model
    launcher = launcher or Launcher()
    folder = {(task, row.folder): out / task / (f"{row.folder}_tuned" if tune else row.folder) for task, _, _ in cells
              for row in rows}
    config = {}
    if tune:
        sweeps = {(task, row.folder): dict(out=folder[task, row.folder] / "tune", model=model, weights=weights, spec=spec,
                                           method=row.method, method_opts=row.options, grid=tune,
                                           seeds=seeds[:tune_seeds], **settings)
                  for task, _, spec in cells for row in rows}
        if launcher.kind != "local" or launcher.workers > 1:  # every row's sweep at once, each trial after trial:
            # no worker waits on a sweep's last trial, and workers start once, not once per sweep; a sweep with its
            # choice written (best.yaml) is done and only read back below, so a finished bench starts no workers
            launch([(f"tune {task} {row}", tune_row, kw) for (task, row), kw in sweeps.items()
                    if not (kw["out"] / "best.yaml").is_file()], launcher, out / "logs")
        config = {key: str(tune_row(**kw)) for key, kw in sweeps.items()}  # the choices, read back (or run here)
    grid = [(task, group, spec, row, seed) for task, group, spec in cells for row in rows for seed in seeds]
    calls = [dict(cell=folder[task, row.folder] / f"seed{seed}", label=f"[{n}/{len(grid)}] {task} {row.label} seed {seed}",
                  model=model, weights=weights, spec=spec, method=row.method, method_opts=row.options or None,
                  seed=seed, **settings, **({"config": config[task, row.folder]} if tune else {}))
             for n, (task, _, spec, row, seed) in enumerate(grid, 1)]
    if launcher.kind != "local" or launcher.workers > 1:  # elsewhere first; then every cell below is read back
        launch([(c["label"], run_cell, c) for c in calls if not (c["cell"] / "summary.json").is_file()],
               launcher, out / "logs")
    results = []
    for (task, group, _, row, seed), call in zip(grid, calls):
        res = run_cell(**call)
        results.append({"task": task, "group": group, "method": row.label, "seed": seed,
                        "test_acc": res["test_acc"], "val_acc": res["val_acc"], "protocol": res["protocol"],
                        "trainable_params": res["trainable_params"], "method_params": res["method_params"],
                        "lr": res["config"]["lr"], "epochs": res["config"]["epochs"],
                        "train_wall_s": res["train_wall_s"], "code": res.get("code", ""),
                        "command": cell_command(call, res["config"], tune)})
    return results


def write_results(rows: list[dict], out: Path, suite: str, name: str = "results", published: str | None = None) -> str:
    """<name>.csv, <name>.md (paper-shaped table, published rows below) and a PNG of accuracy vs parameters
    (the bench's ``accuracy_vs_params.png``; ``<name>.png`` for a study)."""
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / f"{name}.csv", rows)
    table = markdown_table(rows, suite, published)
    atomic_write(out / f"{name}.md", lambda f: f.write(table + "\n"), "w")
    plot_accuracy_vs_params(rows, out / ("accuracy_vs_params.png" if name == "results" else f"{name}_params.png"))
    print(table)
    return table


def _agg(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def markdown_table(rows: list[dict], suite: str, published: str | None = None) -> str:
    """The measured rows (mean ± std over seeds), then ``published`` (default: the suite's published table)."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    groups = list(dict.fromkeys(r["group"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    head = ["method", "params (M)", *tasks, *[f"{g} mean" for g in groups if len(groups) > 1], "mean",
            *(["mean of groups"] if len(groups) > 1 else [])]
    body = []
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        seeds = sorted({r["seed"] for r in mine})
        per_task = {t: _agg([r["test_acc"] for r in mine if r["task"] == t]) for t in tasks}
        # group and overall means are computed per seed, then mean ± std over seeds
        def seed_means(keep) -> tuple[float, float]:
            return _agg([statistics.fmean(r["test_acc"] for r in mine if r["seed"] == s and keep(r)) for s in seeds])
        cells = [f"{m}", f"{statistics.fmean(r['method_params'] for r in mine) / 1e6:.3f}"]
        cells += [f"{a:.1f} ± {s:.1f}" if len(seeds) > 1 else f"{a:.1f}" for a, s in per_task.values()]
        if len(groups) > 1:
            for g in groups:
                a, s = seed_means(lambda r, g=g: r["group"] == g)
                cells.append(f"{a:.1f} ± {s:.1f}" if len(seeds) > 1 else f"{a:.1f}")
        a, s = seed_means(lambda r: True)
        cells.append(f"**{a:.1f}** ± {s:.1f}" if len(seeds) > 1 else f"**{a:.1f}**")
        if len(groups) > 1:  # the other VTAB-1k convention: mean of the group means, per seed
            a, s = _agg([statistics.fmean(statistics.fmean(r["test_acc"] for r in mine if r["seed"] == sd
                                                           and r["group"] == g) for g in groups) for sd in seeds])
            cells.append(f"{a:.1f} ± {s:.1f}" if len(seeds) > 1 else f"{a:.1f}")
        body.append(cells)
    lines = [table(head, body)]
    if any("lr" in r for r in rows):  # the rate behind every cell: one per row and task unless seeds differ
        rates = [[m, *("/".join(f"{v:g}" for v in sorted({float(r["lr"]) for r in rows if r["method"] == m
                                                             and r["task"] == t and r.get("lr")})) for t in tasks)]
                 for m in methods]
        lines += ["", "Learning rate per row and task:", "", table(["method", *tasks], rates)]
    protocols = sorted({r["protocol"] for r in rows})
    lines.append(f"\nTop-1 % on test, mean ± std over seeds {sorted({r['seed'] for r in rows})}; protocol: "
                 f"{', '.join(protocols)}; params = method parameters without the head.")
    if published is None and markdown_published(suite):
        published = (f"Published (not run here; from rlrr/configs/published/{suite}.csv, both means recomputed from the "
                     f"cells; 'printed' is the paper's own mean and its convention):\n\n{markdown_published(suite)}")
    if published:
        lines.append(f"\n{published}")
    return "\n".join(lines)


def plot_accuracy_vs_params(rows: list[dict], path: Path) -> None:
    fig, ax = figure(figsize=(5.5, 4))
    for m in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == m]
        params = max(statistics.fmean(r["method_params"] for r in mine), 1)
        acc = statistics.fmean(r["test_acc"] for r in mine)
        ax.scatter(params, acc, s=40)
        ax.annotate(m, (params, acc), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(xscale="log", xlabel="trainable method parameters (log; linear probe shown at 1)",
           ylabel="mean top-1 (%)", title="accuracy vs trainable parameters")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
