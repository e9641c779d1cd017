"""SSF (Lian et al., NeurIPS 2022): per-channel scale and shift of features, ``y·γ + β``.

``FeatureRescale`` is also the feature rescaling that RLRR's official code puts after the norms
and the patch embedding, so RLRR imports it from here.  It merges into the wrapped module's
per-channel affine (norm weight/bias, or linear/conv output rows).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

from ..backbones import family_of, matching
from .base import Method, MergeError, freeze, register, replace


def out_channels(module: nn.Module) -> int:
    """Number of output channels of a module whose output SSF rescales."""
    if hasattr(module, "proj") and hasattr(module, "norm"):  # timm PatchEmbed
        return module.proj.out_channels
    for attr in ("out_features", "out_channels", "num_features"):
        if hasattr(module, attr):
            return getattr(module, attr)
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[0]
    raise TypeError(f"cannot tell the channel count of {type(module).__name__}")


def channel_dim(module: nn.Module) -> int:
    """Channels-first outputs (BatchNorm, LayerNorm2d, conv) scale dim 1; token/NHWC outputs the last."""
    return 1 if isinstance(module, (nn.modules.batchnorm._BatchNorm, LayerNorm2d, nn.GroupNorm, nn.Conv2d)) else -1


class FeatureRescale(nn.Module):
    """``inner(x) · γ + β`` per channel, with γ ~ N(1, σ), β ~ N(0, σ) (σ = 0 gives the identity)."""

    adapter_params = ("scale", "shift")

    def __init__(self, inner: nn.Module, std: float = 0.02):
        super().__init__()
        self.inner = inner
        self.dim = channel_dim(inner)
        c = out_channels(inner)
        like = next(inner.parameters(), torch.empty(0))
        self.scale = nn.Parameter(torch.ones(c, dtype=like.dtype, device=like.device))
        self.shift = nn.Parameter(torch.zeros(c, dtype=like.dtype, device=like.device))
        if std > 0:
            nn.init.normal_(self.scale, 1.0, std)
            nn.init.normal_(self.shift, 0.0, std)
        # After a token LayerNorm, γ, β fold into its affine at every call: the same function, but the
        # norm's own backward yields their gradients from the statistics it keeps anyway, so the rescale
        # stores no activation of its own and adds no pass over the tokens.
        self.folds_into_norm = (isinstance(inner, nn.LayerNorm) and self.dim == -1
                                and inner.weight is not None and inner.bias is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folds_into_norm:
            n = self.inner
            return F.layer_norm(x, n.normalized_shape, n.weight * self.scale, n.bias * self.scale + self.shift, n.eps)
        y = self.inner(x)
        shape = [1] * y.ndim
        shape[self.dim] = -1
        return y * self.scale.view(shape).to(y.dtype) + self.shift.view(shape).to(y.dtype)

    def merged(self) -> nn.Module:
        """The wrapped module with γ, β folded into its per-channel affine."""
        fold_channel_affine(self.inner, self.scale.detach(), self.shift.detach())
        return self.inner


def fold_channel_affine(module: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Make ``module(x)`` compute ``module(x)·scale + shift`` per output channel, in place."""
    if hasattr(module, "proj") and hasattr(module, "norm"):  # PatchEmbed: its last affine op
        target = module.proj if isinstance(module.norm, nn.Identity) else module.norm
        return fold_channel_affine(target, scale, shift)
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if weight is None or bias is None:
        raise MergeError(f"{type(module).__name__} has no affine weight and bias to fold a scale/shift into")
    s = scale.to(weight.dtype)
    weight.mul_(s.view(-1, *[1] * (weight.ndim - 1)))
    bias.mul_(s).add_(shift.to(bias.dtype))


def inject_feature_rescale(model: nn.Module, pattern: str, std: float, need_bias: bool = False) -> None:
    """Wrap every module matching ``pattern``; with ``need_bias``, skip bias-free layers (ResNet convs),
    whose output a norm rescales next anyway, so the result stays mergeable."""
    for name, module in matching(model, pattern):
        if need_bias and isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is None:
            continue
        replace(model, name, FeatureRescale(module, std))


def merge_feature_rescale(model: nn.Module) -> None:
    for name, module in list(model.named_modules()):
        if isinstance(module, FeatureRescale):
            replace(model, name, module.merged())


@dataclass
class SSFConfig:
    """SSF after every block linear and norm, the patch embedding and the final norm (paper defaults)."""
    method: ClassVar[str] = "ssf"
    init_std: float = 0.02
    train_head: bool = True


def apply_ssf(model: nn.Module, cfg: SSFConfig) -> nn.Module:
    fam = family_of(model)
    freeze(model, cfg.train_head)
    inject_feature_rescale(model, f"{fam.linear}|{fam.norms}", cfg.init_std, need_bias=True)
    return model


def merge_ssf(model: nn.Module) -> nn.Module:
    merge_feature_rescale(model)
    return model


register(Method("ssf", SSFConfig, apply_ssf, merge_ssf))
