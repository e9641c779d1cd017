"""HTA — Householder Transformation Adaptation (Dong et al., NeurIPS 2024), **reconstructed**: the paper
has no public code, so every choice marked "ours" below is this project's, not the authors'.

Per adapted square D×D map: ``W' = W + u vᵀ + H_a diag(d) H_c`` with ``H_x = I − x xᵀ`` (unnormalised,
as the paper prints it) and learnable u, v, a, c, d ∈ R^D: 5·D parameters per map.  Applied to tokens
without forming any D×D matrix: ``x W'ᵀ = x Wᵀ + (x·v) uᵀ + t`` with ``t = x − (x·c) cᵀ; t = t ⊙ d;
t = t − (t·a) aᵀ`` (H is symmetric, so ``(H_a D H_c)ᵀ = H_c D H_a``).

* Layers: the four square attention maps per block — q, k, v (row slices of timm's fused qkv, or HF's
  separate projections) and the output projection — which is what the paper's counts fit exactly
  (4 × 5·768 × 12 = 184,320 on ViT-B/16).  (Ours: the paper does not name them.)
* Init (ours; not stated): zero start with d = 0 and v = 0; u ~ N(0, 1/D); a, c ~ N(0, 1/D), so each
  Householder factor starts near the identity.
* Merges exactly: the dense ΔW is added to the frozen weight.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..backbones.discover import DiscoveryError, discover, role
from .base import AroundLinear, Method, add_to_rows, freeze, merge_modules, register, replace

SLICES = {"q": 0, "k": 1, "v": 2}


class HTALinear(AroundLinear):
    """A frozen Linear plus HTA updates on square row slices ``[(start, stop), ...]`` of its weight."""

    def __init__(self, base: nn.Linear, slices: list[tuple[int, int]]):
        super().__init__(base)
        self.slices = slices
        d = base.in_features
        like = dict(dtype=base.weight.dtype, device=base.weight.device)
        # one (5, D) tensor per slice: rows u, v, a, c, d
        self.units = nn.ParameterList([nn.Parameter(torch.zeros(5, d, **like)) for _ in slices])
        with torch.no_grad():
            for p in self.units:
                p[[0, 2, 3]] = torch.randn(3, d, **like) / d ** 0.5

    @property
    def adapter_params(self) -> tuple[str, ...]:
        return tuple(f"units.{i}" for i in range(len(self.slices)))

    @staticmethod
    def update(x: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
        """x ΔWᵀ for one unit, in O(D) per token."""
        u, v, a, c, d = unit
        t = x - (x @ c).unsqueeze(-1) * c
        t = t * d
        t = t - (t @ a).unsqueeze(-1) * a
        return t + (x @ v).unsqueeze(-1) * u

    @staticmethod
    def dense(unit: torch.Tensor) -> torch.Tensor:
        """ΔW = u vᵀ + H_a diag(d) H_c as a D×D matrix (for merging only)."""
        u, v, a, c, d = unit
        eye = torch.eye(len(u), dtype=u.dtype, device=u.device)
        return torch.outer(u, v) + (eye - torch.outer(a, a)) @ torch.diag(d) @ (eye - torch.outer(c, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return add_to_rows(self.base(x), self.slices, [self.update(x, unit) for unit in self.units])

    def merged(self) -> nn.Linear:
        for (a, b), unit in zip(self.slices, self.units):
            self.base.weight[a:b] += self.dense(unit)
        return self.base


@dataclass
class HTAConfig:
    """targets: roles of the square attention maps to adapt (q, k, v and proj by default)."""
    method: ClassVar[str] = "hta"
    targets: tuple[str, ...] = ("q", "k", "v", "proj")
    train_head: bool = True


def hta_slices(name: str, module: nn.Linear, wanted: set[str]) -> list[tuple[int, int]]:
    """Square row slices of ``module`` for the roles in ``wanted`` (a fused qkv gives three)."""
    kind, d = role(name), module.in_features
    if kind == "qkv" and module.out_features == 3 * d:
        return [(SLICES[t] * d, (SLICES[t] + 1) * d) for t in ("q", "k", "v") if t in wanted]
    return [(0, d)] if kind in wanted and module.out_features == d else []


def apply_hta(model: nn.Module, cfg: HTAConfig) -> nn.Module:
    chosen = []
    for name in discover(model).targets:
        module = model.get_submodule(name)
        if isinstance(module, nn.Linear) and (slices := hta_slices(name, module, set(cfg.targets))):
            chosen.append((name, module, slices))
    if not chosen:
        raise DiscoveryError(f"HTA found no square attention maps ({', '.join(cfg.targets)}) in "
                             f"{type(model).__name__}")
    freeze(model, cfg.train_head)
    for name, module, slices in chosen:
        replace(model, name, HTALinear(module, slices))
    return model


def merge_hta(model: nn.Module) -> nn.Module:
    return merge_modules(model, HTALinear)


register(Method("hta", HTAConfig, apply_hta, merge_hta))
