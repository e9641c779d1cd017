"""Data-parallel training through ``torchrun``: the same entry point, one process per device.

With ``WORLD_SIZE`` unset everything here is a no-op, so single-process runs pay nothing.
CPU runs use the gloo backend (how the tests exercise it); CUDA runs use NCCL.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as td
from torch.utils.data import Dataset, RandomSampler
from torch.utils.data.distributed import DistributedSampler


def is_distributed() -> bool:
    return td.is_available() and td.is_initialized()


def setup(device: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group under torchrun."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not is_distributed():
        td.init_process_group("nccl" if device == "cuda" else "gloo")
    rank = td.get_rank() if is_distributed() else 0
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device(device)


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself under torch.compile's and DDP's wrappers."""
    while hasattr(model, "_orig_mod") or isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def train_sampler(ds: Dataset, seed: int, generator: torch.Generator):
    """Shuffled order fixed by ``seed``; each rank gets its own shard under torchrun."""
    if is_distributed():
        return DistributedSampler(ds, shuffle=True, seed=seed)
    return RandomSampler(ds, generator=generator)


def barrier() -> None:
    if is_distributed():
        td.barrier()
