"""``--compile``: torch.compile of the model a command runs, with one line where this torch cannot compile.

The backend is checked once, on a two-element function, before any work: inductor needs a working C++
compiler (and Triton on a GPU), which a machine may not have; the error names the backends that need
neither (``aot_eager``, ``eager``) instead of a page of inductor's traceback in the first training step.
"""
from __future__ import annotations

import functools

import torch


def compiled(model: torch.nn.Module, backend: str) -> torch.nn.Module:
    """``model`` compiled with ``backend`` ("none": as it is)."""
    if backend == "none":
        return model
    check_backend(backend)
    return torch.compile(model, backend=backend)


@functools.cache
def check_backend(backend: str) -> None:
    """Refuse, in one line, a backend that is unknown or cannot compile on this machine."""
    import torch._dynamo
    known = sorted(set(torch._dynamo.list_backends()) | {"inductor", "eager", "aot_eager"})
    if backend not in known:
        raise ValueError(f"--compile {backend}: not a torch.compile backend here; one of {', '.join(known)}")
    try:
        torch.compile(lambda x: x * 2 + 1, backend=backend)(torch.ones(2))
    except Exception as e:  # noqa: BLE001 - any failure to build: the machine lacks what the backend needs
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise RuntimeError(f"--compile {backend}: this torch cannot compile here ({type(e).__name__}: {first}); "
                           "pass --compile aot_eager (no C++ compiler needed) or run without --compile") from None
