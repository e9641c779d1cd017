"""``rlrr train``, ``rlrr demo``, ``rlrr pretrain``: one training run."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from .common import add_run_args, path_arg, run_choice


def cmd_train(args) -> dict:
    from ..engine.experiment import run_experiment
    method, opts, overrides = run_choice(args)
    result = run_experiment(args.model, None if args.weights == "none" else args.weights, args.data, args.output,
                            method, opts, args.config, args.resume, args.num_classes,
                            args.drop_path, args.img_size, args.aug, args.skip_bad_images, overwrite=args.overwrite,
                            **overrides)
    score = (f"val top-1 {result['val_acc']:.2f}% (not tested)" if result["test_acc"] is None
             else f"test top-1 {result['test_acc']:.2f}%")
    print(f"{result['method']} on {result['dataset']} [{result['protocol']}]: {score} "
          f"(selected epoch {result['selected_epoch']}) -> {args.output}/summary.json")
    return result


def cmd_demo(args) -> dict:
    from ..demo import run_demo
    return run_demo(Path(args.output), quick=args.quick, task=args.task)


def cmd_pretrain(args) -> dict:
    from ..pretrain import PretrainConfig, pretrain
    cfg = PretrainConfig(**{f.name: getattr(args, f.name) for f in fields(PretrainConfig)
                            if getattr(args, f.name, None) is not None})
    return pretrain(cfg, Path(args.output), device=args.device, workers=args.workers)


def add_commands(sub) -> None:
    from ..engine.trainer import PROTOCOLS
    p = sub.add_parser("train", help="fine-tune a backbone with a method on a dataset")
    add_run_args(p)
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt (same settings)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished or unfinished run in OUTPUT")
    p.add_argument("--protocol", choices=PROTOCOLS,
                   help="retrain (default), val, test (= --select-on-test), or search (val only, never test)")
    p.add_argument("--select-on-test", dest="protocol", action="store_const", const="test",
                   help="official practice: keep the best test epoch (optimistic; labelled in results)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="offline RLRR vs linear probe on the embedded backbone (minutes on a CPU)")
    p.add_argument("--output", default="runs/demo", type=path_arg)
    p.add_argument("--task", default="mnist")
    p.add_argument("--quick", action="store_true", help="a CI-sized run (seconds)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("pretrain", help="re-create the embedded backbone by fractal pre-training (rerun: continues)")
    p.add_argument("--output", default="rlrr/weights", type=path_arg)
    for name, typ in (("model", str), ("classes", int), ("per_class", int), ("epochs", int), ("batch_size", int),
                      ("lr", float), ("warmup_epochs", int), ("seed", int)):
        p.add_argument("--" + name.replace("_", "-"), type=typ, dest=name)
    p.add_argument("--upright", dest="rotate", action="store_const", const=False,
                   help="keep the fractal renderings upright (default: turned at random, the shipped recipe)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--workers", type=int, default=1, help="processes rendering the data (blocks of 100 classes)")
    p.set_defaults(func=cmd_pretrain)
