"""Optimiser and schedule as the official RLRR code sets them up (AdamW + timm cosine with warm-up)."""
from __future__ import annotations

import torch
from timm.scheduler import CosineLRScheduler


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: no weight decay on biases, norms and 1-d vectors.

    The rule is the official code's, by name: 'bias' or 'norm' in the parameter name. Our names make
    two differences (see README): RLRR's ``shift`` is decayed (the official ``shift_bias`` is not),
    and SSF parameters inside a wrapped norm (``norm1.scale``) are exempt (the official ones are not).
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if "bias" in name or "norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                    min_lr: float = 1e-8, warmup_lr: float = 1e-7) -> CosineLRScheduler:
    """Cosine decay stepped per update (so short runs get a smooth schedule), linear warm-up."""
    return CosineLRScheduler(optimizer, t_initial=max(total_steps, 1), lr_min=min_lr, warmup_t=warmup_steps,
                             warmup_lr_init=warmup_lr, t_in_epochs=False)
