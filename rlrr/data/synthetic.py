"""Procedurally generated images that need no download.

* ``fractal_images`` — formula-driven pre-training data in the spirit of FractalDB (Kataoka et al.,
  ACCV 2020): every class is one random iterated function system (IFS); samples are renderings of
  that system with its parameters jittered and the view rotated / flipped / rescaled.  It is how the
  embedded backbone is pre-trained without natural images.
* ``shapes_task`` — small structured tasks in the spirit of VTAB's structured group
  (dSprites-like position / orientation, Clevr-like counting), used as offline downstream tasks.

Everything is a deterministic function of a seed so a run can be reproduced exactly.
"""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np


def _sample_ifs(rng: np.random.Generator) -> np.ndarray:
    """One class: 2–4 contractive affine maps ``[a b c d e f]`` that render to a non-degenerate shape."""
    while True:
        n = rng.integers(2, 5)
        maps = rng.uniform(-1.0, 1.0, size=(n, 6))
        sv = np.linalg.svd(maps[:, :4].reshape(n, 2, 2), compute_uv=False)
        if sv.max() >= 0.95 or sv.min() < 0.05:
            continue
        # FractalDB's sigma-factor keeps shapes between dust and filled blobs.
        sigma = (sv[:, 0] + 2 * sv[:, 1]).sum()
        if 1.5 * n <= sigma <= 2.6 * n:
            cover = (_render(maps, np.random.default_rng(0), size=32) > 0).mean()
            if 0.06 <= cover <= 0.5:
                return maps


def _render(maps: np.ndarray, rng: np.random.Generator, size: int, chains: int = 512, steps: int = 24,
            angle: float = 0.0, flip: bool = False, zoom: float = 1.0) -> np.ndarray:
    """Chaos-game rendering of an IFS into a ``size``×``size`` float image in [0, 1].

    Many chains run in parallel (vectorised) instead of one long chain, which is what makes
    generating tens of thousands of images on a CPU take seconds.
    """
    det = np.abs(np.linalg.det(maps[:, :4].reshape(-1, 2, 2))) + 1e-3
    prob = det / det.sum()
    pts = rng.uniform(-1, 1, size=(chains, 2))
    out = []
    for step in range(steps):
        k = rng.choice(len(maps), size=chains, p=prob)
        m = maps[k]
        pts = np.stack([m[:, 0] * pts[:, 0] + m[:, 1] * pts[:, 1] + m[:, 4],
                        m[:, 2] * pts[:, 0] + m[:, 3] * pts[:, 1] + m[:, 5]], axis=1)
        if step >= 4:
            out.append(pts)
    pts = np.concatenate(out)
    pts = pts[np.isfinite(pts).all(1)]
    c, s = np.cos(angle), np.sin(angle)
    pts = pts @ np.array([[c, -s], [s, c]])
    if flip:
        pts[:, 0] = -pts[:, 0]
    lo, hi = np.percentile(pts, 1, axis=0), np.percentile(pts, 99, axis=0)
    center, half = (lo + hi) / 2, (hi - lo).max() / 2 / zoom + 1e-6
    ij = ((pts - center) / half * 0.5 + 0.5) * (size - 1)
    ij = np.round(ij).astype(int)
    keep = ((ij >= 0) & (ij < size)).all(1)
    img = np.zeros((size, size), np.float32)
    np.add.at(img, (ij[keep, 1], ij[keep, 0]), 1.0)
    return np.clip(img / max(np.percentile(img[img > 0], 90), 1.0), 0, 1) if keep.any() else img


BLOCK = 100  # classes drawn from one seed


def fractal_images(num_classes: int = 100, per_class: int = 200, size: int = 32, seed: int = 0, jitter: float = 0.06,
                   rotate: bool = True, workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8, N×size×size) and labels of ``num_classes`` IFS classes × ``per_class`` renderings.

    Classes come in blocks of 100, block k drawn from ``seed + k``, so a block renders in a process of its own
    (``workers``: 1,000 classes × 150 renderings in 78 s on 16 cores) with the same images whatever the
    count, and the first 100 classes of a larger set are those of a smaller one.  ``rotate=False`` keeps every
    rendering upright (flips and zoom stay), so the features may keep an orientation instead of being
    taught to ignore it — at 1,000 classes an easy pretext (99.8 % held-out after 5 epochs; BENCHMARKS.md).
    """
    blocks = [(min(BLOCK, num_classes - first), per_class, size, seed + first // BLOCK, jitter, rotate)
              for first in range(0, num_classes, BLOCK)]
    if workers > 1 and len(blocks) > 1:
        with ProcessPoolExecutor(min(workers, len(blocks)), mp_context=get_context("spawn")) as pool:
            parts = list(pool.map(_fractal_block, *zip(*blocks)))
    else:
        parts = [_fractal_block(*b) for b in blocks]
    return (np.concatenate([images for images, _ in parts]),
            np.concatenate([labels + k * BLOCK for k, (_, labels) in enumerate(parts)]))


def _fractal_block(num_classes: int, per_class: int, size: int, seed: int, jitter: float,
                   rotate: bool) -> tuple[np.ndarray, np.ndarray]:
    """One block: its IFS systems and their renderings, all from one random stream."""
    rng = np.random.default_rng(seed)
    systems = [_sample_ifs(rng) for _ in range(num_classes)]
    imgs = []
    for maps in systems:
        for _ in range(per_class):
            m = maps * rng.uniform(1 - jitter, 1 + jitter, size=maps.shape)
            angle = rng.uniform(0, 2 * np.pi)  # drawn either way: an upright set is the same renderings unturned
            img = _render(m, rng, size, angle=angle if rotate else 0.0, flip=bool(rng.integers(2)),
                          zoom=rng.uniform(0.8, 1.1))
            imgs.append((img * 255).astype(np.uint8))
    return np.stack(imgs), np.repeat(np.arange(num_classes, dtype=np.int64), per_class)


def shapes_task(task: str, n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """A structured task as (uint8 images N×size×size, labels, num_classes).

    ``dsprites_loc``: a random shape; label = its x position in 8 bins.
    ``dsprites_ori``: an elongated bar; label = its orientation in 8 bins of 180°.
    ``clevr_count``: 1–6 blobs; label = count − 1.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    imgs = np.zeros((n, size, size), np.float32)
    labels = np.zeros(n, np.int64)
    for i in range(n):
        if task == "dsprites_loc":
            label = rng.integers(8)
            cx = (label + rng.uniform(0.1, 0.9)) * size / 8
            cy, r = rng.uniform(5, size - 5), rng.uniform(2, 4)
            if rng.integers(2):
                imgs[i] = (np.abs(xx - cx) < r) & (np.abs(yy - cy) < r)
            else:
                imgs[i] = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        elif task == "dsprites_ori":
            label = rng.integers(8)
            theta = (label + rng.uniform(0.1, 0.9)) * np.pi / 8
            cx, cy = rng.uniform(10, size - 10, size=2)
            u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
            v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
            imgs[i] = (np.abs(u) < rng.uniform(6, 9)) & (np.abs(v) < 1.5)
        elif task == "clevr_count":
            label = rng.integers(6)
            for _ in range(label + 1):
                cx, cy, r = rng.uniform(3, size - 3), rng.uniform(3, size - 3), rng.uniform(1.5, 3)
                imgs[i] = np.maximum(imgs[i], rng.uniform(0.5, 1) * ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r))
        else:
            raise ValueError(f"unknown synthetic task {task!r}; choose dsprites_loc, dsprites_ori or clevr_count")
        labels[i] = label
    return (imgs * 255).astype(np.uint8), labels, {"dsprites_loc": 8, "dsprites_ori": 8, "clevr_count": 6}[task]
