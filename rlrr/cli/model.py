"""Commands on a trained model: ``eval``, ``predict``, ``merge``, ``export``, ``info``, ``analyze``."""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

from .common import (adapted_model, add_compile_arg, add_model_args, at_least, backbone, data_config, method_options,
                     not_an_input, output_file, path_arg)


def cmd_eval(args) -> dict:
    from ..data import build_data
    from ..engine.compile import compiled
    from ..engine.loop import evaluate
    from torch.utils.data import DataLoader
    from ..backbones import num_classes_of
    model = adapted_model(args)
    splits = build_data(args.data, data_config(model), args.aug, skip_bad=args.skip_bad_images)
    if num_classes_of(model) != splits.num_classes:
        raise ValueError(f"the model's head has {num_classes_of(model)} classes but {args.data} has "
                         f"{splits.num_classes}; evaluate an adapter (or weights) trained on this task")
    res = evaluate(compiled(model, args.compile or "none"), DataLoader(splits[args.split], args.batch_size),
                   next(model.parameters()).device, progress=True)
    out = {"data": args.data, "split": args.split, "top1": res["acc"], "loss": res["loss"], "n": len(splits[args.split])}
    print(json.dumps(out))
    return out


def cmd_predict(args) -> None:
    import torch
    from ..backbones import logits_of
    from ..data.images import DataError, open_rgb
    from ..data.transforms import eval_transform
    from ..engine.compile import compiled
    from ..files import atomic_write
    from ..adapter import Adapter
    from ..backbones import num_classes_of
    out = not_an_input(output_file(args.output), args)
    adapter = Adapter.read(args.adapter) if args.adapter else None  # read once: the model and the class names
    model = adapted_model(args, adapter)
    n = num_classes_of(model)
    topk, names = min(args.topk, n), adapter.class_names(n) if adapter else [str(i) for i in range(n)]
    tf = eval_transform(data_config(model), "none")
    model = compiled(model, args.compile or "none")
    files, skipped = image_files(args.images), []

    def read(path: Path):
        try:
            return tf(open_rgb(path))
        except DataError:
            if not args.skip_bad_images:
                raise
            skipped.append(path)
    rows = [["path"] + [c for k in range(topk) for c in (f"class_{k + 1}", f"prob_{k + 1}")]]
    with torch.no_grad():
        for i in range(0, len(files), args.batch_size):
            chunk = [(x, name) for x, name in ((read(p), name) for p, name in files[i:i + args.batch_size])
                     if x is not None]
            if not chunk:
                continue
            probs = logits_of(model(torch.stack([x for x, _ in chunk]))).softmax(-1)
            top = probs.topk(topk, dim=-1)
            for (_, name), v, k in zip(chunk, top.values, top.indices):
                rows.append([name] + [x for kk, vv in zip(k, v) for x in (names[kk], f"{vv:.4f}")])
    atomic_write(out, lambda f: csv.writer(f).writerows(rows), "w")  # a failed run leaves an old CSV intact
    print(f"wrote {len(rows) - 1} predictions to {args.output}" +
          (f"; skipped {len(skipped)} unreadable image(s), first {skipped[0]}" if skipped else ""))


def image_files(paths: list[str]) -> list[tuple[Path, str]]:
    """``--images``: image files and folders (searched recursively) as (file, name in the CSV); the name is
    relative to the folder when one folder is given, else the path as reached from the command line."""
    from ..data.images import images_under
    one_folder = len(paths) == 1 and Path(paths[0]).is_dir()
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = images_under(path)
            if not found:
                raise FileNotFoundError(f"--images {path}: no image files in this folder or below")
            files += [(f, str(f.relative_to(path) if one_folder else f)) for f in found]
        elif path.is_file():
            files.append((path, str(path)))
        else:
            raise FileNotFoundError(f"--images {path}: no such image file or folder")
    return files


def cmd_merge(args) -> Path:
    from ..adapter import Adapter
    from ..methods.base import merge
    hf = args.model.startswith("hf:")
    out = not_an_input(Path(args.output) if hf else output_file(args.output), args)  # HF: a folder
    if hf and out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} is a file; a merged hf: model is a folder (save_pretrained): name a folder")
    adapter = Adapter.read(args.adapter) if args.adapter else None
    merged = merge(adapted_model(args, adapter))
    if hf:  # a plain transformers folder: from_pretrained loads it
        merged.save_pretrained(out)
        _copy_image_processor(args.model, out)
        write_merged_card(out / "README.md", args.model, str(out), merged, adapter)
        print(f"merged {args.model} + {args.adapter} -> {out}/ (plain transformers, from_pretrained-loadable)")
        return out
    import timm
    from safetensors.torch import save
    from ..files import atomic_write
    fresh = timm.create_model(args.model, pretrained=False, num_classes=merged.num_classes,
                              **({"img_size": args.img_size} if args.img_size else {}))
    fresh.load_state_dict(merged.state_dict(), strict=True)  # proves it is the untouched architecture
    data = save({k: v.contiguous() for k, v in merged.state_dict().items()},
                metadata={"architecture": args.model, "num_classes": str(merged.num_classes)})
    atomic_write(out, lambda f: f.write(data))
    card = write_merged_card(out.with_name(f"{out.stem}.README.md"), args.model, out.name, merged, adapter)
    print(f"merged {args.model} + {args.adapter} -> {out} (plain timm weights, strict-loadable; card {card.name})")
    return out


def write_merged_card(path: Path, model: str, weights_file: str, merged, adapter) -> Path:
    """The Hub model card of a merged model (``rlrr.card``), with the adapter's run summary when beside it."""
    from ..backbones import num_classes_of
    from ..card import merged_card_text
    from ..files import atomic_write
    summary = adapter.path.parent / "summary.json" if adapter else None
    run = json.loads(summary.read_text()) if summary and summary.is_file() else None
    text = merged_card_text(model, weights_file, adapter.meta if adapter else {"method": "none"}, num_classes_of(merged),
                            sum(p.numel() for p in merged.parameters()), run)
    return atomic_write(path, lambda f: f.write(text), "w")


def _copy_image_processor(model: str, out: Path) -> None:
    """Keep the source checkpoint's preprocessing beside the merged HF weights, when it has one."""
    from transformers import AutoImageProcessor
    try:
        AutoImageProcessor.from_pretrained(model.removeprefix("hf:")).save_pretrained(out)
    except (OSError, ValueError):
        pass  # a checkpoint without a processor config (random test models): nothing to keep


def cmd_export(args) -> Path:
    import torch
    from ..backbones.hf import LogitsOnly
    from ..methods.base import merge
    out = not_an_input(output_file(args.output), args)
    model = adapted_model(args)
    if getattr(model, "rlrr_method", None):
        model = merge(model)
    size = data_config(model)["input_size"]
    from ..extras import need
    need("onnx", "ONNX export", "onnx")  # checked first: torch says a missing onnx in several ways
    torch.onnx.export(LogitsOnly(model), (torch.randn(1, *size),), str(out), input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                      dynamo=False)
    print(f"exported merged {args.model} to {out}")
    return out


def cmd_info(args) -> dict:
    from ..methods.base import apply, make_config, summary, trainable_parameters
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
    from ..adapter import read_adapter
    tensors, meta = read_adapter(path)
    info = {**{k: v for k, v in meta.items() if k not in ("shapes", "config")}, "config": json.loads(meta["config"]),
            "tensors": len(tensors), "values": sum(t.numel() for t in tensors.values())}
    for key, value in info.items():
        print(f"{key:<22}{value if not isinstance(value, int) else f'{value:,}'}")
    return info


def cmd_analyze(args) -> dict:
    from ..analysis import run_analysis
    return run_analysis(args.model, None if args.weights == "none" else args.weights, args.adapter,
                        Path(args.output), args.topk, check_fingerprint=not args.ignore_fingerprint)


def add_commands(sub) -> None:
    p = sub.add_parser("eval", help="top-1 of a backbone (+adapter) on a split")
    add_model_args(p)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test", choices=["train", "val", "trainval", "test"])
    p.add_argument("--aug", choices=["none", "flip", "fgvc"])
    p.add_argument("--batch-size", type=at_least(1), default=128)
    p.add_argument("--skip-bad-images", action="store_true")
    add_compile_arg(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="images (files or folders) -> CSV of top-k classes")
    add_model_args(p)
    p.add_argument("--images", required=True, nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--output", default="predictions.csv", type=path_arg)
    p.add_argument("--topk", type=at_least(1), default=5)
    p.add_argument("--batch-size", type=at_least(1), default=64)
    p.add_argument("--skip-bad-images", action="store_true", help="leave unreadable images out (counted)")
    add_compile_arg(p)
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

    p = sub.add_parser("analyze", help="SVD view of how adapters change the pretrained weights")
    add_model_args(p, adapter=False)
    p.add_argument("--adapter", action="append", required=True, help="adapter file (repeat to compare methods)")
    p.add_argument("--topk", type=at_least(1), default=8)
    p.add_argument("--ignore-fingerprint", action="store_true", help="accept adapters trained on other weights")
    p.add_argument("--output", default="runs/analysis", type=path_arg)
    p.set_defaults(func=cmd_analyze)
