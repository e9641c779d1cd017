"""The ``rlrr`` command line: train, eval, predict, merge, export, info, demo, pretrain, bench, serve, analyze.

Every error a user can cause ends as one ``error: ...`` line and exit status 2; no torch traceback.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

from .config import load_yaml


# --- shared pieces ------------------------------------------------------------------------------
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
    from .backbones import create_backbone
    kw = {"img_size": args.img_size} if getattr(args, "img_size", None) else {}
    return create_backbone(args.model, weights=None if args.weights == "none" else args.weights,
                           num_classes=num_classes, **kw)


def data_config(model) -> dict:
    from timm.data import resolve_data_config
    return resolve_data_config({}, model=model)


def adapted_model(args):
    """Backbone (+ adapter if given), ready for inference; the class count comes from the adapter's head
    or, for a merged checkpoint, from the weights file's classifier; the input size from the adapter
    when it was trained at another --img-size and none is given."""
    from .adapter import load_adapter, read_adapter
    from .backbones import checkpoint_num_classes, read_state_dict
    meta = {}
    if args.adapter:
        tensors, meta = read_adapter(args.adapter)
    elif args.weights not in ("none", "pretrained") and Path(args.weights).suffix != ".npz" and Path(args.weights).is_file():
        tensors = read_state_dict(args.weights)
    else:
        tensors = {}
    model = backbone(args, checkpoint_num_classes(args.model, tensors))
    trained_at = json.loads(meta.get("input_size", "null"))
    if trained_at and not args.img_size and list(model.pretrained_cfg["input_size"]) != trained_at:
        args.img_size = tuple(trained_at[1:])
        model = backbone(args, checkpoint_num_classes(args.model, tensors))
    if args.adapter:
        model = load_adapter(model, args.adapter, check_fingerprint=not args.ignore_fingerprint)
    return model.eval()


def not_an_input(out: Path, args) -> Path:
    """Refuse an --output that is one of the command's inputs (weights, adapter, HF source folder):
    writing there would destroy the thing being read."""
    inputs = [getattr(args, "adapter", None), args.weights, args.model.removeprefix("hf:") if args.model.startswith("hf:")
              else None]
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


def add_model_args(p: argparse.ArgumentParser, adapter: bool = True) -> None:
    p.add_argument("--model", default="vit_pico_patch4_32",
                   help="timm architecture name, or hf:<hub id or local folder> (pip install 'rlrr[hf]')")
    p.add_argument("--weights", default="pretrained",
                   help="local .safetensors/.pth/.npz, 'pretrained' (timm/HF cache) or 'none' (random, tests only)")
    p.add_argument("--img-size", type=at_least(1), default=None, help="override the input resolution")
    if adapter:
        p.add_argument("--adapter", default=None, help="adapter .safetensors written by rlrr train")
        p.add_argument("--ignore-fingerprint", action="store_true",
                       help="load the adapter even onto backbone weights other than those it was trained on")


# --- subcommands --------------------------------------------------------------------------------
def cmd_train(args) -> dict:
    from .engine.trainer import TrainConfig
    from .experiment import run_experiment
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    method, opts = args.method, method_options(args.method_opt)
    if args.pace is not None:  # PACE around the method: --pace sigma=1,lambda=0.1
        if method.endswith("+pace"):
            raise ValueError(f"--method {method} already has PACE; drop --pace or the +pace suffix")
        method, opts = f"{method}+pace", {**opts, **method_options(args.pace.split(",") if args.pace else [], "--pace")}
    result = run_experiment(args.model, None if args.weights == "none" else args.weights, args.data, args.output,
                            method, opts, args.config, args.resume, args.num_classes,
                            args.drop_path, args.img_size, args.aug, args.skip_bad_images, overwrite=args.overwrite,
                            **overrides)
    print(f"{result['method']} on {result['dataset']} [{result['protocol']}]: test top-1 {result['test_acc']:.2f}% "
          f"(selected epoch {result['selected_epoch']}) -> {args.output}/summary.json")
    return result


def cmd_eval(args) -> dict:
    from .data import build_data
    from .engine.loop import evaluate
    from torch.utils.data import DataLoader
    from .backbones import num_classes_of
    model = adapted_model(args)
    splits = build_data(args.data, data_config(model), args.aug, skip_bad=args.skip_bad_images)
    if num_classes_of(model) != splits.num_classes:
        raise ValueError(f"the model's head has {num_classes_of(model)} classes but {args.data} has "
                         f"{splits.num_classes}; evaluate an adapter (or weights) trained on this task")
    res = evaluate(model, DataLoader(splits[args.split], args.batch_size), next(model.parameters()).device,
                   progress=True)
    out = {"data": args.data, "split": args.split, "top1": res["acc"], "loss": res["loss"], "n": len(splits[args.split])}
    print(json.dumps(out))
    return out


def cmd_predict(args) -> None:
    import torch
    from torchvision.datasets.folder import IMG_EXTENSIONS
    from .backbones import logits_of
    from .data.images import open_rgb
    from .data.transforms import eval_transform
    from .files import atomic_write
    from .adapter import class_names, read_adapter
    from .backbones import num_classes_of
    out = not_an_input(output_file(args.output), args)
    model = adapted_model(args)
    n = num_classes_of(model)
    topk, names = min(args.topk, n), class_names(read_adapter(args.adapter)[1], n) if args.adapter else [str(i) for i in range(n)]
    tf = eval_transform(data_config(model), "none")
    root = Path(args.images)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} not found")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no images under {root}")
    rows = [["path"] + [c for k in range(topk) for c in (f"class_{k + 1}", f"prob_{k + 1}")]]
    with torch.no_grad():
        for i in range(0, len(files), args.batch_size):
            chunk = files[i:i + args.batch_size]
            probs = logits_of(model(torch.stack([tf(open_rgb(p)) for p in chunk]))).softmax(-1)
            top = probs.topk(topk, dim=-1)
            for p, v, k in zip(chunk, top.values, top.indices):
                rows.append([str(p.relative_to(root))] + [x for kk, vv in zip(k, v) for x in (names[kk], f"{vv:.4f}")])
    atomic_write(out, lambda f: csv.writer(f).writerows(rows), "w")  # a failed run leaves an old CSV intact
    print(f"wrote {len(files)} predictions to {args.output}")


def cmd_merge(args) -> Path:
    from .backbones import is_hf
    from .methods.base import merge
    hf = args.model.startswith("hf:")
    out = not_an_input(Path(args.output) if hf else output_file(args.output), args)  # HF: a folder
    if hf and out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} is a file; a merged hf: model is a folder (save_pretrained): name a folder")
    merged = merge(adapted_model(args))
    if hf:  # a plain transformers folder: from_pretrained loads it
        merged.save_pretrained(out)
        _copy_image_processor(args.model, out)
        print(f"merged {args.model} + {args.adapter} -> {out}/ (plain transformers, from_pretrained-loadable)")
        return out
    import timm
    from safetensors.torch import save
    from .files import atomic_write
    fresh = timm.create_model(args.model, pretrained=False, num_classes=merged.num_classes,
                              **({"img_size": args.img_size} if args.img_size else {}))
    fresh.load_state_dict(merged.state_dict(), strict=True)  # proves it is the untouched architecture
    data = save({k: v.contiguous() for k, v in merged.state_dict().items()},
                metadata={"architecture": args.model, "num_classes": str(merged.num_classes)})
    atomic_write(out, lambda f: f.write(data))
    print(f"merged {args.model} + {args.adapter} -> {out} (plain timm weights, strict-loadable)")
    return out


def _copy_image_processor(model: str, out: Path) -> None:
    """Keep the source checkpoint's preprocessing beside the merged HF weights, when it has one."""
    from transformers import AutoImageProcessor
    try:
        AutoImageProcessor.from_pretrained(model.removeprefix("hf:")).save_pretrained(out)
    except (OSError, ValueError):
        pass  # a checkpoint without a processor config (random test models): nothing to keep


def cmd_export(args) -> Path:
    import torch
    from .backbones.hf import LogitsOnly
    from .methods.base import merge
    out = not_an_input(output_file(args.output), args)
    model = adapted_model(args)
    if getattr(model, "rlrr_method", None):
        model = merge(model)
    size = data_config(model)["input_size"]
    try:
        torch.onnx.export(LogitsOnly(model), (torch.randn(1, *size),), str(out), input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                          dynamo=False)
    except Exception as e:  # noqa: BLE001 - torch reports a missing onnx package in several ways
        if "onnx" in str(e).lower() and "install" in str(e).lower():
            raise RuntimeError("ONNX export needs the onnx package; pip install 'rlrr[onnx]'") from None
        raise
    print(f"exported merged {args.model} to {out}")
    return out


def cmd_info(args) -> dict:
    from .methods.base import apply, make_config, summary, trainable_parameters
    if args.adapter:
        return adapter_info(args.adapter)
    config = make_config(args.method, **method_options(args.method_opt))
    model = apply(backbone(args, args.num_classes), config)
    s = summary(model)
    print(f"{args.method}: " + ", ".join(f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
                                         for k, v in dataclasses.asdict(config).items()))
    groups: dict[str, int] = {}
    for name, p in trainable_parameters(model):
        kind = name.rsplit(".", 1)[-1]
        groups[kind] = groups.get(kind, 0) + p.numel()
    print(f"{'parameter':<24}{'count':>14}")
    for kind, n in groups.items():
        print(f"{kind:<24}{n:>14,}")
    for key in ("method_params", "head_params", "trainable_params", "backbone_params"):
        print(f"{key:<24}{s[key]:>14,}")
    print(f"{'% of backbone':<24}{s['trainable_pct_of_backbone']:>14.4f}")
    return s


def adapter_info(path: str) -> dict:
    """What an adapter file says about itself: method, config, backbone and its fingerprint, tensors."""
    from .adapter import read_adapter
    tensors, meta = read_adapter(path)
    info = {**{k: v for k, v in meta.items() if k not in ("shapes", "config")}, "config": json.loads(meta["config"]),
            "tensors": len(tensors), "values": sum(t.numel() for t in tensors.values())}
    for key, value in info.items():
        print(f"{key:<22}{value if not isinstance(value, int) else f'{value:,}'}")
    return info


def cmd_demo(args) -> dict:
    from .demo import run_demo
    return run_demo(Path(args.output), quick=args.quick, task=args.task)


def cmd_pretrain(args) -> dict:
    from .pretrain import PretrainConfig, pretrain
    cfg = PretrainConfig(**{f.name: getattr(args, f.name) for f in fields(PretrainConfig)
                            if getattr(args, f.name, None) is not None})
    return pretrain(cfg, Path(args.output))


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


def cmd_bench(args) -> list:
    from .bench import run_bench
    return run_bench(args.suite, args.methods, args.seeds, Path(args.output),
                     args.root, args.model, args.weights, args.smoke, epochs=args.epochs, protocol=args.protocol)


def cmd_analyze(args) -> dict:
    from .analysis import run_analysis
    return run_analysis(args.model, None if args.weights == "none" else args.weights, args.adapter,
                        Path(args.output), args.topk, check_fingerprint=not args.ignore_fingerprint)


def cmd_serve(args) -> None:
    try:
        from .serve import Service, serve  # FastAPI and uvicorn: the [serve] extra
    except ImportError:
        raise RuntimeError("rlrr serve needs the serve extra; pip install 'rlrr[serve]'") from None
    from .bank import AdapterBank
    from .data.transforms import eval_transform
    folder = Path(args.adapters) if args.adapters else None
    if folder is not None and not folder.is_dir():
        raise FileNotFoundError(f"--adapters {folder} is not a folder; name the folder holding the *.safetensors adapters")
    pinned = {}
    for spec in args.adapter or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not Path(path).is_file():
            raise ValueError(f"--adapter {spec!r} must be NAME=PATH with an existing adapter file")
        pinned[name] = Path(path)
    model = backbone(args, None)
    service = Service(AdapterBank(model, mode=args.mode), eval_transform(data_config(model), "none"), folder, pinned,
                      args.max_batch, args.max_wait_ms)
    serve(service, args.host, args.port)


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line, like every other rlrr error."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .engine.trainer import PROTOCOLS
    ap = Parser(prog="rlrr", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("train", help="fine-tune a backbone with a method on a dataset")
    add_model_args(p, adapter=False)
    p.add_argument("--data", required=True, help="vtab1k:ROOT/TASK, fgvc:ROOT/NAME, folder:DIR, csv:FILE, offline:TASK")
    p.add_argument("--method", default="rlrr")
    p.add_argument("--method-opt", action="append", metavar="KEY=VALUE", help="method config option (repeatable)")
    p.add_argument("--pace", metavar="sigma=S,lambda=L", nargs="?", const="",
                   help="PACE regularisation around the method (rlrr, lora, ssf, adapter, hta)")
    p.add_argument("--config", help="task YAML (default: configs/<kind>/<task>.yaml when it exists)")
    p.add_argument("--output", required=True, type=path_arg)
    p.add_argument("--num-classes", type=at_least(1))
    p.add_argument("--drop-path", type=float)
    p.add_argument("--aug", choices=["none", "flip", "fgvc"])
    p.add_argument("--skip-bad-images", action="store_true", help="drop unreadable images (counted) instead of failing")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt (same settings)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished or unfinished run in OUTPUT")
    p.add_argument("--protocol", choices=PROTOCOLS, help="retrain (default), val, or test (= --select-on-test)")
    p.add_argument("--select-on-test", dest="protocol", action="store_const", const="test",
                   help="official practice: keep the best test epoch (optimistic; labelled in results)")
    for name, typ in (("epochs", int), ("warmup_epochs", int), ("lr", float), ("weight_decay", float),
                      ("batch_size", int), ("grad_accum", int), ("clip_grad", float), ("label_smoothing", float),
                      ("seed", int), ("num_workers", int), ("min_lr", float), ("warmup_lr", float)):
        p.add_argument("--" + name.replace("_", "-"), type=typ, dest=name)
    p.add_argument("--amp", choices=["none", "bf16", "fp16"])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--deterministic", action="store_true", default=None)
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="top-1 of a backbone (+adapter) on a split")
    add_model_args(p)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test", choices=["train", "val", "trainval", "test"])
    p.add_argument("--aug", choices=["none", "flip", "fgvc"])
    p.add_argument("--batch-size", type=at_least(1), default=128)
    p.add_argument("--skip-bad-images", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="folder of images -> CSV of top-k classes")
    add_model_args(p)
    p.add_argument("--images", required=True)
    p.add_argument("--output", default="predictions.csv", type=path_arg)
    p.add_argument("--topk", type=at_least(1), default=5)
    p.add_argument("--batch-size", type=at_least(1), default=64)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("merge", help="backbone + adapter -> plain timm safetensors")
    add_model_args(p)
    p.add_argument("--output", required=True, type=path_arg)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="merged model -> ONNX")
    add_model_args(p)
    p.add_argument("--output", required=True, type=path_arg)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("info", help="trainable-parameter table of a model + method, or what an adapter file says")
    add_model_args(p, adapter=False)
    p.add_argument("--adapter", default=None, help="print this adapter's metadata (method, backbone, fingerprint)")
    p.add_argument("--method", default="rlrr")
    p.add_argument("--method-opt", action="append", metavar="KEY=VALUE")
    p.add_argument("--num-classes", type=at_least(1), default=None)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="offline RLRR vs linear probe on the embedded backbone (minutes on a CPU)")
    p.add_argument("--output", default="runs/demo", type=path_arg)
    p.add_argument("--task", default="mnist")
    p.add_argument("--quick", action="store_true", help="a CI-sized run (seconds)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("pretrain", help="re-create the embedded backbone by fractal pre-training")
    p.add_argument("--output", default="rlrr/weights", type=path_arg)
    for name, typ in (("classes", int), ("per_class", int), ("epochs", int), ("batch_size", int), ("lr", float),
                      ("seed", int)):
        p.add_argument("--" + name.replace("_", "-"), type=typ, dest=name)
    p.set_defaults(func=cmd_pretrain)
    p = sub.add_parser("bench", help="task x method x seed grid, resumable, paper-shaped table")
    p.add_argument("--suite", choices=["mini", "vtab1k", "fgvc"], default="mini")
    p.add_argument("--methods", default="linear,full,bitfit,ssf,lora,adapter,vpt,rlrr,rlrr+pace,hta,apla", type=comma_list(),
                   help="comma-separated; peft tuners as peft:<tuner> (needs the peft group)")
    p.add_argument("--seeds", default="0,1,2", type=comma_list(int))
    p.add_argument("--root", help="folder with the suite's task folders (vtab1k, fgvc)")
    p.add_argument("--model", default=None, help="backbone (default: the suite's)")
    p.add_argument("--weights", default=None, help="backbone weights file (vtab1k/fgvc: e.g. ViT-B_16.npz)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--protocol", choices=PROTOCOLS, default=None)
    p.add_argument("--smoke", action="store_true", help="one task, one epoch: a CI-sized check of the runner")
    p.add_argument("--output", default="runs/bench", type=path_arg)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", help="HTTP classification service over many task adapters on one backbone")
    add_model_args(p, adapter=False)
    p.add_argument("--adapters", help="folder of *.safetensors adapters, each a task named by its file stem "
                                      "(rescanned: drop a file in or remove it, no restart)")
    p.add_argument("--adapter", action="append", metavar="NAME=PATH", help="one more task (repeatable)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=at_least(1), default=8000)
    p.add_argument("--max-batch", type=at_least(1), default=32, help="images per bank call at most")
    p.add_argument("--max-wait-ms", type=at_least(0.0, float), default=10.0,
                   help="how long the first queued image waits for others to share its batch")
    p.add_argument("--mode", choices=["auto", "shared", "grouped"], default="auto",
                   help="how adapted layers run a mixed batch (see rlrr.bank)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("analyze", help="SVD view of how adapters change the pretrained weights")
    add_model_args(p, adapter=False)
    p.add_argument("--adapter", action="append", required=True, help="adapter file (repeat to compare methods)")
    p.add_argument("--topk", type=at_least(1), default=8)
    p.add_argument("--ignore-fingerprint", action="store_true", help="accept adapters trained on other weights")
    p.add_argument("--output", default="runs/analysis", type=path_arg)
    p.set_defaults(func=cmd_analyze)
    return ap


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a bad argument already said in one line
        return int(e.code or 0)
    from .adapter import AdapterMismatchError
    from .backbones import BackboneError
    from .data.images import DataError
    from .engine.trainer import TrainingStopped
    from .methods.base import MergeError
    try:
        args.func(args)
    except KeyboardInterrupt:
        again = "; rerun with --resume to continue from the last checkpoint" if args.cmd == "train" else ""
        print(f"error: interrupted{again}", file=sys.stderr)
        return 130
    except (DataError, BackboneError, AdapterMismatchError, TrainingStopped, MergeError, FileNotFoundError,
            ValueError, TypeError, KeyError, RuntimeError, OSError) as e:
        if os.environ.get("RLRR_DEBUG"):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a bug of ours, said in one line with where to see more
        if os.environ.get("RLRR_DEBUG"):
            raise
        print(f"error: unexpected {type(e).__name__} in rlrr {args.cmd}: {one_line(e)} "
              "(RLRR_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2
    return 0


def one_line(e: BaseException) -> str:
    """The first line of an error's message; for an error re-raised from a DataLoader worker ("Caught
    DataError in DataLoader worker process 0" + the worker's traceback), the worker's own message."""
    text = str(e.args[0]) if isinstance(e, KeyError) and len(e.args) == 1 else str(e)  # KeyError quotes its text
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught ") and "Original Traceback" in text:
        return lines[-1].split(": ", 1)[-1]
    return lines[0] if lines else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
