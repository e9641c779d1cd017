"""Where independent grid cells run: here one after another, here in N processes, or on Slurm via submitit.

A cell (a bench or study cell, a sweep worker) is a call ``fn(**kwargs)`` that writes its own folder and
resumes from it, so a launcher only decides *where* each call runs; the caller reads the results back
from the folders afterwards, and a crashed or pre-empted cell is simply run again by rerunning the
command.  Slurm jobs go through submitit (the launcher vision research codebases use); where there is
no Slurm, ``slurm`` is one line saying so, never a silent local run (submitit's own fallback).  Its
``local`` executor runs the same path without a cluster only when asked for (``cluster="local"``: the
tests do).
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

LAUNCHERS = ("local", "slurm")


@dataclass
class Launcher:
    """``local`` with ``workers`` processes (1: in this process), or ``slurm`` (``partition``, ``gpus`` and
    ``cpus`` per job, ``time_min`` per job; ``cluster="local"`` runs submitit's local executor instead)."""
    kind: str = "local"
    workers: int = 1
    partition: str | None = None
    gpus: int = 0
    cpus: int = 8
    time_min: int = 240
    cluster: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in LAUNCHERS:
            raise ValueError(f"--launcher must be local or slurm, not {self.kind!r}")
        if self.workers < 1:
            raise ValueError(f"--workers must be at least 1, not {self.workers}")


Call = tuple[str, Callable[..., Any], dict]  # (label, function, keyword arguments)


def launch(calls: list[Call], launcher: Launcher, logs: Path) -> None:
    """Run every call where ``launcher`` says; raise one line naming the failed cells once all have ended
    (finished cells keep their results, so rerunning the command resumes only what failed)."""
    if not calls:
        return
    if launcher.kind == "local" and launcher.workers == 1:
        for _, fn, kwargs in calls:
            fn(**kwargs)
        return
    if launcher.kind == "local":
        failed = _local_pool(calls, launcher.workers)
    else:
        failed = _submitit(calls, launcher, logs)
    if failed:
        label, error = failed[0]
        raise RuntimeError(f"{len(failed)} of {len(calls)} cells failed (first: {label}: {error}); rerun the same "
                           "command to resume them")


def _threads(workers: int) -> None:
    """Each of ``workers`` processes gets its share of the cores (torch would take them all in each)."""
    import torch
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def _local_pool(calls: list[Call], workers: int) -> list[tuple[str, str]]:
    failed = []
    # spawn: a fresh interpreter per worker (forking a process that holds torch threads can hang)
    with ProcessPoolExecutor(min(workers, len(calls)), mp_context=get_context("spawn"), initializer=_threads,
                             initargs=(workers,)) as pool:
        futures = {pool.submit(fn, **kwargs): label for label, fn, kwargs in calls}
        for future in as_completed(futures):
            try:
                future.result()
            except Exception as e:  # noqa: BLE001 - a cell's own failure, reported with its label
                failed.append((futures[future], f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
    return failed


def _submitit(calls: list[Call], launcher: Launcher, logs: Path) -> list[tuple[str, str]]:
    from ..extras import need
    submitit = need("cluster", "--launcher slurm", "submitit")
    cluster = launcher.cluster or "slurm"  # never AutoExecutor's guess: it runs the jobs here when Slurm is absent
    if cluster == "slurm" and submitit.SlurmExecutor.affinity() <= 0:
        raise RuntimeError("--launcher slurm: there is no Slurm here (no srun on PATH); run the command on a "
                           "Slurm login node, or pass --launcher local to run the cells on this machine")
    executor = submitit.AutoExecutor(folder=logs, cluster=cluster)
    executor.update_parameters(name="rlrr", timeout_min=launcher.time_min, gpus_per_node=launcher.gpus,
                               cpus_per_task=launcher.cpus, tasks_per_node=1, nodes=1,
                               **({"slurm_partition": launcher.partition} if launcher.partition else {}))
    with executor.batch():
        jobs = [(label, executor.submit(_call, fn, kwargs)) for label, fn, kwargs in calls]
    print(f"submitted {len(jobs)} jobs ({jobs[0][1].job_id}...); logs in {logs}", flush=True)
    failed = []
    for label, job in jobs:
        try:
            job.result()
        except Exception as e:  # noqa: BLE001 - submitit re-raises the job's error with its log's tail
            failed.append((label, f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''} "
                                  f"(log: {job.paths.stderr})"))
    return failed


def _call(fn: Callable[..., Any], kwargs: dict) -> Any:
    return fn(**kwargs)
