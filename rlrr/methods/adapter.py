"""AdaptFormer (Chen et al., NeurIPS 2022): a bottleneck MLP in parallel with each block's MLP,
``x + MLP(LN(x)) + s·up(ReLU(down(x)))``, down kaiming, up zero (starts at the pretrained function).

Default bottleneck 8 and s = 0.1: the setting behind the 0.16 M VTAB-1k rows that the RLRR and
NOAH papers compare against.  The ReLU makes it non-mergeable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..backbones import family_of
from .base import Method, freeze, register


class ParallelAdapter(nn.Module):
    """Takes over a block's ``norm2`` + ``mlp``: ``mlp(norm2(x)) + s·up(relu(down(x)))``."""

    adapter_params = ("down.weight", "down.bias", "up.weight", "up.bias")

    def __init__(self, norm: nn.Module, mlp: nn.Module, dim: int, bottleneck: int, scale: float):
        super().__init__()
        self.norm, self.mlp, self.scale = norm, mlp, scale
        w = next(mlp.parameters())
        self.down = nn.Linear(dim, bottleneck, device=w.device, dtype=w.dtype)
        self.up = nn.Linear(bottleneck, dim, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(x)) + self.scale * self.up(torch.relu(self.down(x)))


@dataclass
class AdapterConfig:
    method: ClassVar[str] = "adapter"
    bottleneck: int = 8
    scale: float = 0.1
    train_head: bool = True


def apply_adapter(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    fam = family_of(model)
    if fam.name not in ("vit", "swin"):
        raise ValueError(f"the parallel MLP adapter is defined for transformer blocks, not {fam.name}")
    freeze(model, cfg.train_head)
    blocks = [b for n, b in model.named_modules() if hasattr(b, "norm2") and hasattr(b, "mlp")]
    for b in blocks:
        b.mlp = ParallelAdapter(b.norm2, b.mlp, b.norm2.normalized_shape[0], cfg.bottleneck, cfg.scale)
        b.norm2 = nn.Identity()
    return model


register(Method("adapter", AdapterConfig, apply_adapter, None))
