"""LoRA (Hu et al., ICLR 2022): ``W' = W + (α/r)·B A`` on chosen linears, A kaiming, B zero.

Paper default: rank 8 on the attention query and value projections.  timm fuses q, k, v into one
``qkv`` Linear, so targets may name row slices of it (``q``, ``k``, ``v``), each with its own A, B,
exactly like separate LoRA layers on separate projections.  Merges into the frozen weight.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.discover import ROLES, DiscoveryError, discover, matching, role
from .base import AroundLinear, Method, add_to_rows, freeze, merge_modules, register, replace

QKV_SLICES = {"q": 0, "k": 1, "v": 2}


class LoRALinear(AroundLinear):
    """A frozen Linear plus low-rank updates on row slices ``[(start, stop), ...]`` of its weight."""

    def __init__(self, base: nn.Linear, slices: list[tuple[int, int]], rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base)
        self.slices, self.scaling = slices, alpha / rank
        like = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.lora_A = nn.ParameterList([nn.Parameter(torch.empty(rank, base.in_features, **like)) for _ in slices])
        self.lora_B = nn.ParameterList([nn.Parameter(torch.zeros(b - a, rank, **like)) for a, b in slices])
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)

    @property
    def adapter_params(self) -> tuple[str, ...]:
        return tuple(f"lora_{m}.{i}" for m in "AB" for i in range(len(self.slices)))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) with ``B @ A`` the full-size update (α/r)·B_i A_i in its row slices: the slices' A stacked
        (Σr × in), their scaled B placed block-diagonally (out × Σr)."""
        a = torch.cat(list(self.lora_A))
        b = a.new_zeros(self.base.out_features, a.shape[0])
        col = 0
        for (lo, hi), B in zip(self.slices, self.lora_B):
            b[lo:hi, col:col + B.shape[1]] = self.scaling * B
            col += B.shape[1]
        return b, a

    def delta(self) -> torch.Tensor:
        """The full-size update (α/r)·B A placed in its row slices."""
        b, a = self.factors()
        return b @ a

    def bank_rows(self) -> tuple[str, dict[str, torch.Tensor]]:
        """What a bank of adapters stacks for this layer: the update's factors, at a weight site."""
        b, a = self.factors()
        return "weight", {"lora_A": a, "lora_B": b}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(x)
        parts = [F.linear(F.linear(h, A), B) * self.scaling for A, B in zip(self.lora_A, self.lora_B)]
        return add_to_rows(self.base(x), self.slices, parts)

    def merged(self) -> nn.Linear:
        self.base.weight.add_(self.delta())
        return self.base


@dataclass
class LoRAConfig:
    """rank, alpha (scaling α/r), targets: roles of the discovered block linears — q, k, v (also as
    slices of a fused qkv), qkv, proj, fc1, fc2, recognised by leaf name in timm and HF models — or
    regexes over module names for any other layer."""
    method: ClassVar[str] = "lora"
    rank: int = 8
    alpha: float = 8.0
    targets: tuple[str, ...] = ("q", "v")
    dropout: float = 0.0
    train_head: bool = True


def lora_slices(name: str, module: nn.Linear, wanted: set[str]) -> list[tuple[int, int]]:
    """Row slices of ``module`` that LoRA adapts for the roles in ``wanted`` (none: not a target)."""
    kind = role(name)
    if kind == "qkv" and "qkv" not in wanted:
        d = module.out_features // 3
        return [(QKV_SLICES[t] * d, (QKV_SLICES[t] + 1) * d) for t in ("q", "k", "v") if t in wanted]
    return [(0, module.out_features)] if kind in wanted else []


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    if cfg.rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, not {cfg.rank}")
    roles = {t for t in cfg.targets if t in set(ROLES.values())}
    patterns = [t for t in cfg.targets if t not in roles]
    layers = [(n, model.get_submodule(n)) for n in discover(model).targets] if roles else []
    chosen = [(n, m, lora_slices(n, m, roles)) for n, m in layers if isinstance(m, nn.Linear)]
    chosen += [(n, m, [(0, m.out_features)]) for p in patterns for n, m in matching(model, p) if isinstance(m, nn.Linear)]
    chosen = list({n: (n, m, sl) for n, m, sl in chosen if sl}.values())  # a layer named twice is adapted once
    if not chosen:
        raise DiscoveryError(f"LoRA targets {list(cfg.targets)} match no Linear of this {type(model).__name__}; "
                             "name roles (q, k, v, qkv, proj, fc1, fc2) or regexes with targets=")
    freeze(model, cfg.train_head)
    for name, module, slices in chosen:
        replace(model, name, LoRALinear(module, slices, cfg.rank, cfg.alpha, cfg.dropout))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    return merge_modules(model, LoRALinear)


register(Method("lora", LoRAConfig, apply_lora, merge_lora))
