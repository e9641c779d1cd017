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

from ..backbones.discover import discover, is_norm
from .base import Method, freeze, register, replace


class ParallelAdapter(nn.Module):
    """Takes over a block's ``norm2`` + ``mlp``: ``mlp(norm2(x)) + s·up(relu(down(x)))``.  Arguments after
    ``x`` go to the wrapped MLP (PVTv2's depthwise-conv MLP also takes the feature map's size)."""

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

    channel_dim = -1

    def frozen(self, x: torch.Tensor, *rest) -> torch.Tensor:
        return self.mlp(self.norm(x), *rest)

    def forward(self, x: torch.Tensor, *rest) -> torch.Tensor:
        return self.frozen(x, *rest) + self.scale * self.up(torch.relu(self.down(x)))


@dataclass
class AdapterConfig:
    method: ClassVar[str] = "adapter"
    bottleneck: int = 8
    scale: float = 0.1
    train_head: bool = True


def mlp_sites(model: nn.Module) -> list[tuple[str, str]]:
    """(norm, mlp) name pairs: in each discovered block, its ``mlp`` child and the block's own norm
    called last before it (timm ``norm2``, HF ``layernorm_after`` / ``norm2`` / ``layer_norm2``)."""
    found = discover(model)
    order = {n: i for i, n in enumerate(found.order)}
    sites = []
    for b in found.blocks:
        block = model.get_submodule(b)
        mlp = getattr(block, "mlp", None)
        if not isinstance(mlp, nn.Module) or f"{b}.mlp" not in order or \
                not any(isinstance(m, nn.Linear) for m in mlp.modules()):  # token MLPs only, not ConvMlp
            continue
        norms = [f"{b}.{n}" for n, c in block.named_children() if is_norm(c) and order.get(f"{b}.{n}", 1 << 62)
                 < order[f"{b}.mlp"]]
        if norms:
            sites.append((max(norms, key=order.get), f"{b}.mlp"))
    return sites


def apply_adapter(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    sites = mlp_sites(model)
    if not sites:
        raise ValueError(f"the parallel MLP adapter needs transformer blocks with a norm and an 'mlp' child; "
                         f"{type(model).__name__} has none")
    freeze(model, cfg.train_head)
    for norm_name, mlp_name in sites:
        norm, mlp = model.get_submodule(norm_name), model.get_submodule(mlp_name)
        dim = next(m for m in mlp.modules() if isinstance(m, nn.Linear)).in_features
        replace(model, mlp_name, ParallelAdapter(norm, mlp, dim, cfg.bottleneck, cfg.scale))
        replace(model, norm_name, nn.Identity())
    return model


register(Method("adapter", AdapterConfig, apply_adapter, None))
