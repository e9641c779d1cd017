"""The baselines that add no modules: linear probe, full fine-tuning and BitFit.

They differ only in which existing parameters train, so they share one file; merging is trivial
(the weights already are plain weights).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from .base import Method, freeze, register


@dataclass
class LinearProbeConfig:
    """Only the new classifier head trains."""
    method: ClassVar[str] = "linear"


@dataclass
class FullConfig:
    """Every parameter trains (the upper-cost reference)."""
    method: ClassVar[str] = "full"


@dataclass
class BitFitConfig:
    """BitFit (Ben Zaken et al., ACL 2022): every bias term trains, plus the head."""
    method: ClassVar[str] = "bitfit"
    pattern: str = r".*\.bias"


def _linear(model: nn.Module, cfg: LinearProbeConfig) -> nn.Module:
    freeze(model)
    return model


def _full(model: nn.Module, cfg: FullConfig) -> nn.Module:
    model.requires_grad_(True)
    return model


def _bitfit(model: nn.Module, cfg: BitFitConfig) -> nn.Module:
    freeze(model)
    rx = re.compile(cfg.pattern)
    for name, p in model.named_parameters():
        if rx.fullmatch(name):
            p.requires_grad_(True)
    return model


def _unchanged(model: nn.Module) -> nn.Module:
    return model


register(Method("linear", LinearProbeConfig, _linear, _unchanged))
register(Method("full", FullConfig, _full, _unchanged))
register(Method("bitfit", BitFitConfig, _bitfit, _unchanged))
