"""Grids of runs: ``rlrr bench`` (task × method × seed, or ``--study NAME``, the paper's ablations) and
``rlrr sweep`` (the per-task hyper-parameter search); both resumable, both through a launcher."""
from __future__ import annotations

from pathlib import Path

from .common import add_execution_args, add_launcher_args, add_run_args, at_least, comma_list, launcher_of, path_arg, run_choice


def cmd_bench(args) -> list | dict:
    if args.agreement_only:
        from ..grid.bench import score_agreement
        return score_agreement(Path(args.output), study=args.study)
    from ..grid.sweep import parse_grid
    settings = dict(epochs=args.epochs, protocol=args.protocol, grad_checkpointing=args.grad_checkpointing,
                    compile=args.compile, log=args.log, log_group=str(args.output) if args.log else None,
                    tune=parse_grid(args.tune, "--tune", relative=True) if args.tune else None, tune_seeds=args.tune_seeds)
    if args.study:
        from ..grid.study import run_study
        return run_study(args.study, args.suite, args.seeds, Path(args.output), args.root, args.model, args.weights,
                         args.smoke, launcher_of(args), **settings)
    from ..grid.bench import run_bench
    return run_bench(args.suite, args.methods, args.seeds, Path(args.output), args.root, args.model, args.weights,
                     args.smoke, launcher_of(args), **settings)


def cmd_sweep(args) -> dict:
    from ..grid.cells import RUN_OPTIONS
    from ..grid.sweep import Sweep, parse_grid
    method, opts, overrides = run_choice(args)
    if overrides.get("log"):  # the sweep's trials are one group in the trackers
        overrides["log_group"] = str(args.output)
    run = {k: v for k in RUN_OPTIONS if (v := getattr(args, k)) is not None and v is not False}
    sweep = Sweep(Path(args.output), args.model, None if args.weights == "none" else args.weights, args.data,
                  method, opts, parse_grid(args.grid), args.budget, args.config, seeds=args.seeds, **run, **overrides)
    return sweep.run(launcher_of(args))


def add_commands(sub) -> None:
    from ..engine.trainer import PROTOCOLS
    from ..grid.study import STUDIES
    p = sub.add_parser("bench", help="task x method x seed grid (or --study: the paper's ablations), resumable")
    p.add_argument("--suite", default="mini", help="mini, proxy (4 tasks on 100 images, a FractalDB-1k-scale backbone, "
                   "each rate tuned on val over two seeds: the suite calibrated against VTAB-1k), vtab1k, fgvc, or "
                   "offline tasks as a comma-separated list of "
                   "offline:TASK[:N] (N training images, default 800), e.g. offline:mnist:200,offline:clevr_count:200")
    p.add_argument("--methods", default="linear,full,bitfit,ssf,lora,adapter,vpt,rlrr,rlrr+pace,hta,apla", type=comma_list(),
                   help="comma-separated; peft tuners as peft:<tuner> (needs the peft group)")
    p.add_argument("--study", choices=list(STUDIES),
                   help="an ablation of RLRR's design instead of --methods: "
                        + "; ".join(f"{k}: {v}" for k, v in STUDIES.items()))
    p.add_argument("--seeds", default="0,1,2", type=comma_list(int))
    p.add_argument("--root", help="folder with the suite's task folders (vtab1k, fgvc)")
    p.add_argument("--model", default=None, help="backbone (default: the suite's)")
    p.add_argument("--weights", default=None, help="backbone weights file (vtab1k/fgvc: e.g. ViT-B_16.npz)")
    p.add_argument("--epochs", type=at_least(1), default=None)
    p.add_argument("--protocol", choices=[x for x in PROTOCOLS if x != "search"], default=None)
    p.add_argument("--smoke", action="store_true", help="one task, one epoch, the first seed: a CI-sized check")
    p.add_argument("--tune", action="append", metavar="KEY=V1,V2,...",
                   help="choose each row's KEY per task on val first (a sweep at the first seed; test never read), "
                        "then run its cells with the choice; xF values are multiples of the row's own value, e.g. "
                        "--tune lr=x0.33,x1,x3 (repeatable)")
    p.add_argument("--tune-seeds", type=at_least(1), default=None, metavar="N",
                   help="score each tuning trial by its mean val over the first N of --seeds: a rate that diverges "
                        "at one seed loses, at N times the tuning's cost (default: 1; the proxy suite's own: 2)")
    p.add_argument("--output", default="runs/bench", type=path_arg)
    add_execution_args(p)
    p.add_argument("--agreement-only", action="store_true",
                   help="train nothing: score the finished bench (or --study) in --output against the published "
                        "VTAB-1k ranking (the study's published table)")
    add_launcher_args(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("sweep", help="per-task hyper-parameter search on val, then the choice retrained and tested once")
    add_run_args(p)
    p.add_argument("--grid", action="append", metavar="KEY=V1,V2,...",
                   help="search KEY over these values (repeatable; default: the paper's grid of lr, weight_decay, "
                        "drop_path, batch_size); keys not given keep the task's values")
    p.add_argument("--budget", type=at_least(1), help="at most this many trials (a seeded random part of the grid)")
    p.add_argument("--seeds", type=comma_list(int), default=None,
                   help="run every trial at each of these seeds and score it by their mean val (e.g. 0,1): a setting "
                        "that diverges at one seed loses; the final run uses the first (default: --seed alone)")
    add_launcher_args(p)
    p.set_defaults(func=cmd_sweep)
