"""Wall-clock timing shared by the benchmark scripts: medians after warm-up, CUDA synchronised, and
interleaved rounds so that the machine's drift hits every variant alike."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], reps: int, device: str, warmup: int = 2) -> float:
    """Median time of ``fn()`` over ``reps`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def best_interleaved(fns: dict[str, Callable[[], object]], reps: int, device: str, rounds: int = 2,
                     warmup: int = 1) -> dict[str, float]:
    """Each variant's best median over ``rounds`` rounds that run all variants in turn."""
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = median_seconds(fn, reps, device, warmup)
            best[name] = min(best.get(name, t), t)
    return best
