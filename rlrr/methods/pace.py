"""PACE (Ni et al., NeurIPS 2024): a training-time regulariser around a method whose layers are a frozen
output plus a residual, ``h(x) = h0(x) + Δh(x)`` — RLRR, LoRA, SSF, AdaptFormer and HTA here.

* Training forward: ``h(x) = h0(x) + z ⊙ Δh(x)``, z ~ N(1, σ_l²) drawn per sample and output channel
  (shared across tokens / pixels), no gradient through z.  Eval: no noise.
* σ_l falls linearly with depth over the model's L discovered blocks: block i (0-based) gets
  σ·(L − i)/(L − q) after q quiet blocks that get none (``quiet_blocks``, default 0), so the first
  noisy block gets σ and the last σ/(L − q); layers outside blocks (stem, final norm) get none.  The
  official code counts the head as one more block with the smallest σ, and leaves ViT-B's first block
  quiet ("works better"): ``quiet_blocks=1``.  Our head is trained in full, with no frozen part to
  perturb around, so it gets no noise — our choice.
* Objective: the batch runs twice with independent noise (concatenated into one forward),
  ``CE(logits₁, y) + λ · mean_batch ‖logits₁ − logits₂‖²``; DropPath draws one mask per sample and
  uses it for both copies.  λ = 0 runs one copy (the plain objective).
* Merges exactly when the wrapped method merges (the noise is training-only; nothing to fold).

Use: method ``<name>+pace`` (``rlrr+pace``) with options ``sigma``, ``lambda`` and ``quiet_blocks``;
CLI ``--method rlrr --pace sigma=1,lambda=0.1``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.discover import discover, holding_block
from ..config import check_fields
from .base import Composed, Method, cross_entropy, get_method, make_config, register

MAX_SIGMA = 10.0
PACE_KEYS = {"sigma": "sigma", "lambda": "lam", "lam": "lam", "quiet_blocks": "quiet_blocks"}


@dataclass
class PaceConfig:
    """sigma: noise scale of the first noisy block; lam: weight of the consistency term;
    quiet_blocks: leading blocks without noise; inner: the wrapped method's config."""
    inner: Any = None
    sigma: float = 1.0
    lam: float = 0.1
    quiet_blocks: int = 0

    @property
    def method(self) -> str:
        return f"{self.inner.method}+pace"

    def __post_init__(self) -> None:
        # the noise multiplies each layer's update: far beyond a few units it only drowns the signal in NaN
        if not 0 <= self.sigma <= MAX_SIGMA:
            raise ValueError(f"PACE sigma must be in [0, {MAX_SIGMA:g}] (the paper sweeps 0.1-2), not {self.sigma}")
        if not 0 <= self.lam < math.inf:
            raise ValueError(f"PACE lambda must be a finite number 0 or more, not {self.lam}")
        if not (isinstance(self.quiet_blocks, int) and self.quiet_blocks >= 0):
            raise ValueError(f"PACE quiet_blocks must be a whole number 0 or more, not {self.quiet_blocks!r}")


class PaceObjective:
    """``objective(model, x, y, label_smoothing) -> (loss, logits of the first copy)`` for the trainer."""

    def __init__(self, lam: float):
        self.lam = lam

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0):
        from ..backbones.hf import logits_of
        if self.lam == 0:
            return cross_entropy(model, x, y, label_smoothing)
        both = logits_of(model(torch.cat([x, x]))).float()
        first, second = both.chunk(2)
        loss = F.cross_entropy(first, y, label_smoothing=label_smoothing)
        return loss + self.lam * (first - second).pow(2).sum(-1).mean(), first


def residual_noise(sigma: float):
    """Forward hook: ``h0 + z ⊙ (h − h0)`` in training, z ~ N(1, σ²) per sample and channel."""
    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        if not module.training or sigma == 0:
            return None
        with torch.no_grad():
            base = module.frozen(*args)  # the call's own arguments (an MLP may take more than x)
            shape = [out.shape[0]] + [1] * (out.ndim - 1)
            dim = module.channel_dim if out.ndim > 2 else -1
            shape[dim] = out.shape[dim]
            z = torch.randn(shape, device=out.device, dtype=out.dtype).mul_(sigma).add_(1)
        return base + z * (out - base)
    return hook


def shared_drop_path(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
    """Forward hook on a DropPath: one keep-mask per sample, used by both halves of the doubled batch."""
    p = getattr(module, "drop_prob", 0.0)
    x = args[0]
    if not module.training or not p or x.shape[0] % 2:
        return None
    keep = 1 - p
    mask = x.new_empty((x.shape[0] // 2,) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    if getattr(module, "scale_by_keep", True):
        mask.div_(keep)
    return x * torch.cat([mask, mask])


def apply_pace(model: nn.Module, cfg: PaceConfig, inner: Method) -> nn.Module:
    blocks = discover(model).blocks  # before the inner method renames anything
    model = inner.apply(model, cfg.inner)
    sites = [(n, m) for n, m in model.named_modules() if callable(getattr(m, "frozen", None))]
    if not sites:
        raise ValueError(f"PACE needs a method whose layers are a frozen output plus a residual (rlrr, lora, ssf, "
                         f"adapter, hta), not {inner.name}")
    depth, quiet = len(blocks), cfg.quiet_blocks
    if quiet >= depth:
        raise ValueError(f"PACE quiet_blocks={quiet} leaves none of the model's {depth} blocks noisy; use fewer")
    for name, module in sites:
        i = holding_block(blocks, name)
        module.pace_sigma = 0.0 if i is None or i < quiet else cfg.sigma * (depth - i) / (depth - quiet)
        module.register_forward_hook(residual_noise(module.pace_sigma))
    for m in model.modules():
        if type(m).__name__ == "DropPath":
            m.register_forward_hook(shared_drop_path)
    model.objective = PaceObjective(cfg.lam)
    return model


def pace_method(name: str) -> Method:
    """The method ``<inner>+pace``: the inner method applied, then PACE around its layers."""
    if name[:-5].endswith("+pace"):
        raise ValueError(f"{name} applies PACE twice; use {name[:-5]}")
    inner = get_method(name[:-5])

    def merge(model: nn.Module) -> nn.Module:
        del model.objective
        return inner.merge(model)
    return Method(name, PaceConfig, lambda model, cfg: apply_pace(model, cfg, inner), merge if inner.merge else None)


def pace_config(name: str, values: dict) -> PaceConfig:
    """A PaceConfig from flat values (``sigma``, ``lambda`` and the inner method's options) or from
    adapter metadata (``inner`` as a dict)."""
    values = dict(values)
    own = {PACE_KEYS[k]: values.pop(k) for k in list(values) if k in PACE_KEYS}
    inner = values.pop("inner", None) or {}
    return PaceConfig(inner=make_config(name[:-5], **{**inner, **values}), **check_fields(PaceConfig, own, "PACE"))


register(Composed(lambda name: name.endswith("+pace") and not name.startswith("peft:"), pace_method, pace_config))
