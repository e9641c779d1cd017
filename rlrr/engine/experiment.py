"""One fine-tuning run from plain values: backbone + data + method + task config -> Trainer.

Shared by ``rlrr train``, ``rlrr demo`` and ``rlrr bench`` so the three cannot drift apart.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from timm.data import resolve_data_config

from ..backbones import check_input_size, create_backbone, fingerprint, set_num_classes
from ..config import check_fields, method_lr, method_opts as task_method_opts, task_config, task_config_path
from ..data import build_data
from .trainer import TrainConfig, Trainer
from ..methods.base import apply, format_summary, make_config, summary


def plan(data: str, method: str, method_opts: dict[str, Any] | None = None, config: str | None = None,
         **train_overrides: Any) -> tuple[dict, TrainConfig, Any]:
    """The task config, training config and method config a run would use, without building anything:
    what ``rlrr bench`` compares a finished cell against before reusing it."""
    task = task_config(data, config)
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(train_overrides) - known
    if unknown:
        raise TypeError(f"unknown training option(s) {sorted(unknown)}")
    where = f"config {task_config_path(data, config)}, train"
    written = task.get("train") or {}
    if not isinstance(written, dict) or set(written) - known:
        raise ValueError(f"{where} must map training options ({', '.join(sorted(known))}) to values; "
                         f"unknown: {sorted(set(written) - known) if isinstance(written, dict) else written!r}")
    written = check_fields(TrainConfig, written, where)
    try:  # the file's own values first, so a bad one is named with the file it is in
        TrainConfig(**written)
    except ValueError as e:
        raise ValueError(f"{e} (set in {where})") from None
    lr = method_lr(task, method)
    cfg = TrainConfig(**{**written, **({"lr": lr} if lr else {}),
                         **{k: v for k, v in train_overrides.items() if v is not None}})
    return task, cfg, make_config(method, **{**task_method_opts(task, method), **(method_opts or {})})


def run_experiment(model: str, weights: str | None, data: str, output: str | Path, method: str = "rlrr",
                   method_opts: dict[str, Any] | None = None, config: str | None = None, resume: bool = False,
                   num_classes: int | None = None, drop_path: float | None = None, img_size: int | None = None,
                   aug: str | None = None, skip_bad_images: bool = False, verbose: bool = True,
                   overwrite: bool = False, restart: str = "pass --overwrite to start over",
                   on_epoch=None, **train_overrides: Any) -> dict:
    """Train and test one (model, data, method); returns the summary dict also written to summary.json.

    Precedence: explicit ``train_overrides`` > the method's rate in the task config > the task config >
    ``TrainConfig`` defaults; explicit ``method_opts`` > the method's options in the task config.
    ``resume`` continues a run with the same settings (checked: model, backbone fingerprint, data, method
    and options, every training value); ``overwrite`` replaces a run in ``output``; ``restart`` is the
    advice for starting over that errors give (the bench deletes a cell instead of passing --overwrite);
    ``on_epoch`` sees every epoch's metrics row (a sweep's pruner).
    """
    task, cfg, mcfg = plan(data, method, method_opts, config, **train_overrides)
    num_classes = num_classes or task.get("num_classes")
    drop_path = task.get("drop_path", 0.0) if drop_path is None else drop_path
    kw = {"drop_path_rate": drop_path} if drop_path else {}
    if img_size:
        kw["img_size"] = img_size
    torch.manual_seed(cfg.seed)  # random backbones / fresh heads are the same on --resume
    base = create_backbone(model, weights=weights, num_classes=num_classes, **kw)
    check_input_size(base)
    splits = build_data(data, resolve_data_config({}, model=base), aug or task.get("aug"), cfg.seed,
                        skip_bad_images, num_classes)
    if num_classes is None:
        set_num_classes(base, splits.num_classes)
    base.backbone_fingerprint = fingerprint(base)  # once; every copy the trainer makes inherits it
    settings = {"model": model, "weights": str(weights), "backbone_fingerprint": base.backbone_fingerprint, "data": data,
                "method": method,
                "method_options": dataclasses.asdict(mcfg), "num_classes": splits.num_classes,
                "drop_path": drop_path, "img_size": img_size, "aug": aug or task.get("aug")}

    def make_model() -> torch.nn.Module:
        return apply(copy.deepcopy(base), mcfg)

    if verbose:
        print(format_summary(summary(make_model())))
    return Trainer(make_model, splits, cfg, Path(output), settings, overwrite, restart, on_epoch).fit(resume=resume)
