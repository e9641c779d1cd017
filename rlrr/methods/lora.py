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

from ..backbones import family_of, matching
from .base import Method, freeze, register, replace

QKV_SLICES = {"q": 0, "k": 1, "v": 2}


class LoRALinear(nn.Module):
    """A frozen Linear plus low-rank updates on row slices ``[(start, stop), ...]`` of its weight."""

    def __init__(self, base: nn.Linear, slices: list[tuple[int, int]], rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base, self.slices, self.scaling = base.requires_grad_(False), slices, alpha / rank
        like = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.lora_A = nn.ParameterList([nn.Parameter(torch.empty(rank, base.in_features, **like)) for _ in slices])
        self.lora_B = nn.ParameterList([nn.Parameter(torch.zeros(b - a, rank, **like)) for a, b in slices])
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)

    @property
    def adapter_params(self) -> tuple[str, ...]:
        return tuple(f"lora_{m}.{i}" for m in "AB" for i in range(len(self.slices)))

    def delta(self) -> torch.Tensor:
        """The full-size update (α/r)·B A placed in its row slices."""
        d = torch.zeros_like(self.base.weight)
        for (a, b), A, B in zip(self.slices, self.lora_A, self.lora_B):
            d[a:b] = self.scaling * (B @ A)
        return d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        h = self.dropout(x)
        parts = [F.linear(F.linear(h, A), B) * self.scaling for A, B in zip(self.lora_A, self.lora_B)]
        if len(self.slices) == 1 and self.slices[0] == (0, y.shape[-1]):
            return y + parts[0]
        pieces, last = [], 0
        for (a, b), p in zip(self.slices, parts):  # zeros where a row slice has no update
            pieces += [y.new_zeros(*y.shape[:-1], a - last), p]
            last = b
        pieces.append(y.new_zeros(*y.shape[:-1], y.shape[-1] - last))
        return y + torch.cat(pieces, dim=-1)

    def merged(self) -> nn.Linear:
        self.base.weight.add_(self.delta())
        return self.base


@dataclass
class LoRAConfig:
    """rank, alpha (scaling α/r), targets: q/k/v slices of a fused qkv and/or proj, fc1, fc2."""
    method: ClassVar[str] = "lora"
    rank: int = 8
    alpha: float = 8.0
    targets: tuple[str, ...] = ("q", "v")
    dropout: float = 0.0
    train_head: bool = True


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    fam = family_of(model)
    unknown = set(cfg.targets) - set(QKV_SLICES) - {"qkv", "proj", "fc1", "fc2"}
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; use q, k, v, qkv, proj, fc1, fc2")
    freeze(model, cfg.train_head)
    found = 0
    for name, module in matching(model, fam.linear):
        leaf = name.rsplit(".", 1)[-1]
        if not isinstance(module, nn.Linear):
            continue
        if leaf == "qkv":
            d = module.out_features // 3
            slices = [(QKV_SLICES[t] * d, (QKV_SLICES[t] + 1) * d) for t in ("q", "k", "v") if t in cfg.targets]
            if "qkv" in cfg.targets:
                slices = [(0, module.out_features)]
        else:
            slices = [(0, module.out_features)] if leaf in cfg.targets else []
        if slices:
            replace(model, name, LoRALinear(module, slices, cfg.rank, cfg.alpha, cfg.dropout))
            found += 1
    if not found:
        raise ValueError(f"LoRA targets {list(cfg.targets)} match no Linear of this {fam.name} model")
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            replace(model, name, module.merged())
    return model


register(Method("lora", LoRAConfig, apply_lora, merge_lora))
