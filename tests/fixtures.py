"""Small on-disk datasets in the real layouts, made from scikit-learn's real handwritten digits."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def digit_images(n: int, seed: int = 0) -> tuple[list[Image.Image], list[int]]:
    d = load_digits()
    idx = np.random.default_rng(seed).permutation(len(d.target))[:n]
    imgs = [Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).resize((32, 32)).convert("RGB") for i in idx]
    return imgs, [int(d.target[i]) for i in idx]


def make_vtab(root: Path, task: str = "svhn", sizes=(40, 10, 30)) -> Path:
    """``root/task`` with images/ and train800/val200/train800val200/test lists (scaled down)."""
    task_dir = root / task
    (task_dir / "images").mkdir(parents=True)
    imgs, labels = digit_images(sum(sizes))
    lines = []
    for i, (img, y) in enumerate(zip(imgs, labels)):
        img.save(task_dir / "images" / f"{i:04d}.png")
        lines.append(f"images/{i:04d}.png {y}")
    a, b = sizes[0], sizes[0] + sizes[1]
    for name, part in (("train800", lines[:a]), ("val200", lines[a:b]), ("train800val200", lines[:b]),
                       ("test", lines[b:])):
        (task_dir / f"{name}.txt").write_text("\n".join(part) + "\n")
    return task_dir


def make_fgvc(root: Path, name: str = "CUB_200_2011", n: int = 30) -> Path:
    """VPT json-split layout with 1-based labels (as CUB's are)."""
    ds = root / name
    (ds / "images" / "birds").mkdir(parents=True)
    imgs, labels = digit_images(n, seed=1)
    entries = {}
    for i, (img, y) in enumerate(zip(imgs, labels)):
        img.save(ds / "images" / "birds" / f"{i}.jpg")
        entries[f"birds/{i}.jpg"] = y + 1
    keys = list(entries)
    for split, part in (("train", keys[:18]), ("val", keys[18:24]), ("test", keys[24:])):
        (ds / f"{split}.json").write_text(json.dumps({k: entries[k] for k in part}))
    return ds


def make_folder(root: Path, n: int = 30) -> Path:
    imgs, labels = digit_images(n, seed=2)
    for i, (img, y) in enumerate(zip(imgs, labels)):
        (root / f"class_{y}").mkdir(parents=True, exist_ok=True)
        img.save(root / f"class_{y}" / f"{i}.png")
    return root
