"""Pieces every command family shares: option parsing, the backbone an inference command names, paths."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..config import load_yaml


def method_options(opts: list[str] | None, flag: str = "--method-opt") -> dict:
    """``key=value`` pairs of ``flag``, values parsed as YAML scalars/lists (1e-3, nan are numbers)."""
    values = {}
    for opt in opts or []:
        key, sep, val = opt.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} {opt!r} must look like key=value")
        values[key.strip().replace("-", "_")] = load_yaml(val, f"{flag} {opt}", lines=False)
    return values


def backbone(args, num_classes: int | None):
    """The backbone an inference command names (--model, --weights, --img-size)."""
    from ..backbones import create_backbone
    kw = {"img_size": args.img_size} if getattr(args, "img_size", None) else {}
    return create_backbone(args.model, weights=None if args.weights == "none" else args.weights,
                           num_classes=num_classes, **kw)


def data_config(model) -> dict:
    from timm.data import resolve_data_config
    return resolve_data_config({}, model=model)


def adapted_model(args, adapter=None):
    """Backbone (+ the adapter ``--adapter`` names, or ``adapter`` already read), ready for inference, through
    the one loading path (``rlrr.adapter.load_model``): class count and input size decided before building."""
    from ..adapter import load_model
    return load_model(args.model, None if args.weights == "none" else args.weights, adapter or args.adapter,
                      args.img_size, check_fingerprint=not args.ignore_fingerprint)


def local_weights(args) -> Path | None:
    """The weights file ``--weights`` names (a folder: the weights file in it); None for pretrained / none
    and for hf: models (which load their own and refuse --weights)."""
    from ..backbones import pretrained_tag, weights_file
    local = args.weights != "none" and pretrained_tag(args.weights) is None and not args.model.startswith("hf:")
    return weights_file(args.weights) if local else None


def not_an_input(out: Path, args) -> Path:
    """Refuse an --output that is one of the command's inputs (weights, adapter, HF source folder):
    writing there would destroy the thing being read."""
    inputs = [getattr(args, "adapter", None), local_weights(args),
              args.model.removeprefix("hf:") if args.model.startswith("hf:") else None]
    for given in filter(None, inputs):
        if Path(given).exists() and out.exists() and out.resolve() == Path(given).resolve():
            raise ValueError(f"--output {out} is an input of this command ({given}); write to another path")
    return out


def path_arg(text: str) -> str:
    """argparse type: a path that is not empty (``--output ''`` would write into the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty; name a folder or file")
    return text


def output_file(path: str) -> Path:
    """An output file path: refused when it is a folder or its folder does not exist."""
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"--output {out} is a folder; name a file, e.g. {out / 'out'}{out.suffix or ''}")
    if not out.parent.is_dir():
        raise ValueError(f"--output {out}: folder {out.parent} does not exist; create it or pick another path")
    return out


def at_least(low: float, kind=int):
    """argparse type: a number not below ``low`` (so --batch-size 0 is refused where it enters)."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not v >= low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, not {text}")
        return v
    return parse


def comma_list(kind=str):
    """argparse type: ``a,b,c`` as a list without blanks or repeats (``linear,,linear`` is one method)."""
    def parse(text: str) -> list:
        items = list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
        try:
            return [kind(x) for x in items]
        except ValueError:
            bad = next(x for x in items if not x.lstrip("-").isdigit())
            raise argparse.ArgumentTypeError(f"{bad!r} is not an integer; give comma-separated integers") from None
    return parse


def add_model_args(p: argparse.ArgumentParser, adapter: bool = True) -> None:
    p.add_argument("--model", default="vit_pico_patch4_32",
                   help="timm architecture name, or hf:<hub id or local folder> (pip install 'rlrr[hf]')")
    p.add_argument("--weights", default="pretrained",
                   help="local .safetensors/.pth/.npz (or a downloaded Hub folder holding one), 'pretrained' "
                        "(timm/HF cache; the shipped weights of our small ViTs), 'pretrained:TAG' (timm's <model>.TAG, "
                        "e.g. pretrained:augreg_in21k; ours: pretrained:fractal1k) or 'none' (random, tests only)")
    p.add_argument("--img-size", type=at_least(1), default=None, help="override the input resolution")
    if adapter:
        p.add_argument("--adapter", default=None, help="adapter .safetensors written by rlrr train")
        p.add_argument("--ignore-fingerprint", action="store_true",
                       help="load the adapter even onto backbone weights other than those it was trained on")



def add_run_args(p: argparse.ArgumentParser) -> None:
    """What a training run is made of, shared by ``rlrr train`` and ``rlrr sweep``: model, data, method and
    every training value (a sweep searches some of them and fixes the rest from these)."""
    add_model_args(p, adapter=False)
    p.add_argument("--data", required=True, help="vtab1k:ROOT/TASK, fgvc:ROOT/NAME, folder:DIR, csv:FILE, "
                   "hfds:HUB_ID|DIR[:CONFIG][?image=COL&label=COL] (Hugging Face datasets: save_to_disk or parquet "
                   "folders), offline:TASK[:N] (N training images)")
    p.add_argument("--method", default="rlrr")
    p.add_argument("--method-opt", action="append", metavar="KEY=VALUE", help="method config option (repeatable)")
    p.add_argument("--pace", metavar="sigma=S,lambda=L", nargs="?", const="",
                   help="PACE regularisation around the method (rlrr, lora, ssf, adapter, hta)")
    p.add_argument("--config", help="task YAML (default: rlrr/configs/<kind>/<task>.yaml when it exists)")
    p.add_argument("--output", required=True, type=path_arg)
    p.add_argument("--num-classes", type=at_least(1))
    p.add_argument("--drop-path", type=float)
    p.add_argument("--aug", choices=["none", "flip", "fgvc"])
    p.add_argument("--skip-bad-images", action="store_true", help="drop unreadable images (counted) instead of failing")
    for name, typ in TRAIN_VALUES:
        p.add_argument("--" + name.replace("_", "-"), type=typ, dest=name)
    p.add_argument("--amp", choices=["none", "bf16", "fp16"])
    add_execution_args(p)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--deterministic", action="store_true", default=None)
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)


def add_compile_arg(p: argparse.ArgumentParser, what: str = "the model") -> None:
    p.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help=f"torch.compile {what} (default backend inductor; aot_eager needs no C++ compiler)")


def add_execution_args(p: argparse.ArgumentParser) -> None:
    """How training runs (not what it computes): shared by train, sweep and bench."""
    p.add_argument("--grad-checkpointing", action="store_true", default=None,
                   help="recompute each block's activations in backward: much less memory, about one more forward")
    add_compile_arg(p)
    p.add_argument("--log", metavar="TRACKERS", help="also log runs to tensorboard, mlflow and/or wandb "
                   "(comma-separated; pip install 'rlrr[track]'): config, parameter counts, per-epoch metrics and "
                   "rate, the test result and the curves; a grid's runs are grouped")


TRAIN_VALUES = (("epochs", int), ("warmup_epochs", int), ("lr", float), ("weight_decay", float), ("batch_size", int),
                ("grad_accum", int), ("clip_grad", float), ("label_smoothing", float), ("seed", int),
                ("num_workers", int), ("min_lr", float), ("warmup_lr", float))


def run_choice(args) -> tuple[str, dict, dict]:
    """(method name, method options, training overrides) of a run's flags; ``--pace`` composes ``+pace``."""
    from dataclasses import fields
    from ..engine.trainer import TrainConfig
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    method, opts = args.method, method_options(args.method_opt)
    if args.pace is not None:  # PACE around the method: --pace sigma=1,lambda=0.1
        if method.endswith("+pace"):
            raise ValueError(f"--method {method} already has PACE; drop --pace or the +pace suffix")
        method, opts = f"{method}+pace", {**opts, **method_options(args.pace.split(",") if args.pace else [], "--pace")}
    return method, opts, overrides


def add_launcher_args(p: argparse.ArgumentParser) -> None:
    """Where a grid's independent runs go (``rlrr.grid.launch``)."""
    p.add_argument("--launcher", choices=["local", "slurm"], default="local",
                   help="local: --workers processes here; slurm: one job per run through submitit")
    p.add_argument("--workers", type=at_least(1), default=1, help="local processes (default 1: one after another)")
    p.add_argument("--partition", help="slurm partition")
    p.add_argument("--gpus", type=at_least(0), default=1, help="GPUs per slurm job")
    p.add_argument("--cpus", type=at_least(1), default=8, help="CPUs per slurm job")
    p.add_argument("--time-min", type=at_least(1), default=240, help="time limit per slurm job, minutes")


def launcher_of(args):
    from ..grid.launch import Launcher
    return Launcher(args.launcher, args.workers, args.partition, args.gpus if args.launcher == "slurm" else 0,
                    args.cpus, args.time_min)
