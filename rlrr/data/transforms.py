"""Transforms from the backbone's timm data config.

VTAB-1k: resize straight to the input size, no augmentation (``flip`` adds the official
``simple_aug`` horizontal flip).  FGVC / folders: random-resized-crop + flip for training,
resize + center crop for evaluation.
"""
from __future__ import annotations

import math

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode


def _common(cfg: dict) -> tuple[int, InterpolationMode, T.Normalize]:
    size = cfg["input_size"][-1]
    interp = InterpolationMode(cfg.get("interpolation", "bicubic"))
    return size, interp, T.Normalize(cfg["mean"], cfg["std"])


def train_transform(cfg: dict, aug: str) -> T.Compose:
    """``aug``: "none" (VTAB), "flip" (VTAB simple_aug) or "fgvc"."""
    size, interp, norm = _common(cfg)
    if aug == "fgvc":
        ops = [T.RandomResizedCrop(size, interpolation=interp), T.RandomHorizontalFlip()]
    else:
        ops = [T.Resize((size, size), interpolation=interp)] + ([T.RandomHorizontalFlip()] if aug == "flip" else [])
    return T.Compose([*ops, T.ToTensor(), norm])


def eval_transform(cfg: dict, aug: str) -> T.Compose:
    size, interp, norm = _common(cfg)
    if aug == "fgvc":
        ops = [T.Resize(int(math.floor(size / cfg.get("crop_pct", 0.875))), interpolation=interp), T.CenterCrop(size)]
    else:
        ops = [T.Resize((size, size), interpolation=interp)]
    return T.Compose([*ops, T.ToTensor(), norm])
