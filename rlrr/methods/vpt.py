"""VPT-deep (Jia et al., ECCV 2022): learnable prompt tokens inserted before every block and
dropped after it, so each block sees its own prompts.  Default 10 tokens per block, xavier-uniform
init over the patch dimension as in the paper's code.  Prompts change the sequence, so no merge.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from timm.models.vision_transformer import VisionTransformer
from .base import Method, freeze, register, replace


class PromptedBlock(nn.Module):
    adapter_params = ("prompts",)

    def __init__(self, block: nn.Module, num_tokens: int, dim: int, prefix: int, init_bound: float, dropout: float):
        super().__init__()
        self.block, self.prefix = block, prefix
        w = next(block.parameters())
        self.prompts = nn.Parameter(torch.empty(1, num_tokens, dim, device=w.device, dtype=w.dtype))
        nn.init.uniform_(self.prompts, -init_bound, init_bound)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, n = self.prefix, self.prompts.shape[1]
        prompts = self.dropout(self.prompts.expand(x.shape[0], -1, -1)).to(x.dtype)
        y = self.block(torch.cat([x[:, :p], prompts, x[:, p:]], dim=1))
        return torch.cat([y[:, :p], y[:, p + n:]], dim=1)


@dataclass
class VPTConfig:
    method: ClassVar[str] = "vpt"
    num_tokens: int = 10
    dropout: float = 0.0
    train_head: bool = True


def apply_vpt(model: nn.Module, cfg: VPTConfig) -> nn.Module:
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"VPT-deep is implemented for timm ViT/DeiT token sequences, not {type(model).__name__}")
    freeze(model, cfg.train_head)
    dim, patch = model.embed_dim, model.patch_embed.patch_size
    bound = math.sqrt(6.0 / float(3 * math.prod(patch) + dim))
    for i, block in enumerate(model.blocks):
        replace(model, f"blocks.{i}", PromptedBlock(block, cfg.num_tokens, dim, model.num_prefix_tokens, bound,
                                                    cfg.dropout))
    return model


register(Method("vpt", VPTConfig, apply_vpt, None))
