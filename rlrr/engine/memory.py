"""What autograd keeps alive between forward and backward: the memory a method costs per step, exact and
free of allocator noise (peak RSS also holds transient buffers and memory not yet given back)."""
from __future__ import annotations

from typing import Callable, Iterable

import torch


def saved_activation_bytes(run: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward during ``run()``, not counting
    ``exclude`` (parameters, the input): what must stay alive until backward reaches each layer."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            kept[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(kept.values())
