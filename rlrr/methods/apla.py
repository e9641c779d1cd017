"""APLA (Sorkhei et al., arXiv 2503.11335): train only the attention output projection, and by default
only r of its output rows per block, chosen by a fixed seeded random permutation (weight rows and their
bias entries), plus the head.  ``r="full"`` trains the whole projection.  No new parameters in the
deployed model: the trained rows are written back into the projection (merge is exact by construction).

The official code zeroes the other rows' updates; here the r rows are their own parameter, started at
the pretrained rows, so an optimizer's weight decay cannot move the frozen rows either.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.discover import DiscoveryError, discover, role
from .base import AroundLinear, Method, freeze, merge_modules, register, replace


class RowTunedLinear(AroundLinear):
    """A frozen Linear whose output rows ``rows`` are replaced by trainable ``weight_rows`` / ``bias_rows``."""

    adapter_params = ("weight_rows", "bias_rows")

    def __init__(self, base: nn.Linear, rows: torch.Tensor):
        super().__init__(base)
        self.register_buffer("rows", rows, persistent=False)
        self.weight_rows = nn.Parameter(base.weight.detach()[rows].clone())
        self.bias_rows = nn.Parameter(base.bias.detach()[rows].clone()) if base.bias is not None else None

    def current(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = self.base.weight.index_copy(0, self.rows, self.weight_rows)
        b = None if self.base.bias is None else self.base.bias.index_copy(0, self.rows, self.bias_rows)
        return w, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, *self.current())

    def merged(self) -> nn.Linear:
        w, b = self.current()
        self.base.weight.copy_(w)
        if b is not None:
            self.base.bias.copy_(b)
        return self.base


@dataclass
class APLAConfig:
    """r: output rows of each block's attention projection that train (an int, or "full"); seed: the
    per-block row permutations (block i uses seed + i)."""
    method: ClassVar[str] = "apla"
    r: int | str = 8
    seed: int = 0
    train_head: bool = True


def apply_apla(model: nn.Module, cfg: APLAConfig) -> nn.Module:
    projs = [n for n in discover(model).targets if role(n) == "proj"
             and isinstance(model.get_submodule(n), nn.Linear)]
    if not projs:
        raise DiscoveryError(f"APLA needs attention output projections (proj / o_proj / out_proj); "
                             f"{type(model).__name__} has none")
    if cfg.r != "full" and not (isinstance(cfg.r, int) and cfg.r >= 1):
        raise ValueError(f"APLA r must be a positive int or 'full', not {cfg.r!r}")
    freeze(model, cfg.train_head)
    for i, name in enumerate(projs):
        base = model.get_submodule(name)
        if cfg.r == "full":
            base.requires_grad_(True)
            continue
        perm = torch.randperm(base.out_features, generator=torch.Generator().manual_seed(cfg.seed + i))
        rows = perm[:min(cfg.r, base.out_features)].sort().values.to(base.weight.device)
        replace(model, name, RowTunedLinear(base, rows))
    return model


def merge_apla(model: nn.Module) -> nn.Module:
    return merge_modules(model, RowTunedLinear)


register(Method("apla", APLAConfig, apply_apla, merge_apla))
