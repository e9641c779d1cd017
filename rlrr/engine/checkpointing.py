"""Activation (gradient) checkpointing: each block's activations are dropped after its forward and
recomputed in backward, so a large backbone trains in a fraction of the memory for about one more forward.

Through the library that owns the model where it has a switch: timm's ``set_grad_checkpointing``,
transformers' ``activation_checkpointing_enable`` (``gradient_checkpointing_enable`` before 5.x;
non-reentrant); for any other model, every block that
discovery finds gets its forward run under ``torch.utils.checkpoint`` (non-reentrant, RNG state kept, so
dropout, drop path and PACE's noise are drawn the same in the recomputation), set on the instance so no
module name, parameter or adapter key changes.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def enable_grad_checkpointing(model: nn.Module) -> str:
    """Turn checkpointing on for ``model`` (training only); returns how: "timm", "transformers" or "blocks"."""
    from ..backbones import is_hf
    if is_hf(model):  # transformers 5 renamed the switch; the old name warns that it goes in v6
        switch = getattr(model, "activation_checkpointing_enable", None)
        if switch is not None:
            switch(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return "transformers"
    if hasattr(model, "set_grad_checkpointing"):
        try:
            model.set_grad_checkpointing(True)
            return "timm"
        except (AssertionError, NotImplementedError, TypeError):  # a timm model that has no checkpointing
            pass
    from ..backbones.discover import blocks_of
    blocks = blocks_of(model)
    if not blocks:
        raise ValueError(f"--grad-checkpointing: {type(model).__name__} has no repeated blocks to checkpoint "
                         "(and no checkpointing switch of its own); train without it")
    for name in blocks:
        block = model.get_submodule(name)
        block.forward = functools.partial(_checkpointed, block)  # the block, not its bound method: deepcopy-safe
    return "blocks"


def _checkpointed(block: nn.Module, *args, **kwargs):
    """A block's class forward, checkpointed while training with gradients (plain otherwise: eval, no_grad)."""
    forward = functools.partial(type(block).forward, block)
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)
