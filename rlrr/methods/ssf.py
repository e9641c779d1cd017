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
from torch import nn

from ..backbones.discover import is_norm, is_weight_layer, resolve
from .base import Method, MergeError, freeze, merge_modules, register, replace


class FeatureRescale(nn.Module):
    """``inner(x) · γ + β`` per channel, with γ ~ N(1, σ), β ~ N(0, σ) (σ = 0 gives the identity).

    After a norm, γ and β fold into its affine at every call (``w·γ``, ``b·γ + β``): the same function,
    but the norm's own backward yields their gradients from the statistics it keeps anyway, so the
    rescale stores no activation of its own, and it also sits right where a norm-act layer
    (timm's ``BatchNormAct2d``) applies its affine, before the activation, so it always merges.
    After a Linear/Conv2d the output is scaled (cheaper than scaling the weight, whose gradient would
    cost a GEMM).
    """

    adapter_params = ("scale", "shift")

    def __init__(self, inner: nn.Module, std: float = 0.02):
        super().__init__()
        if not (is_norm(inner) or is_weight_layer(inner)):
            raise TypeError(f"cannot rescale the output of a {type(inner).__name__}; name norms with an affine "
                            "weight and bias, or Linear/Conv2d layers")
        self.inner = inner
        self.folds = is_norm(inner)
        channels_first = (nn.Conv2d, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
        self.channel_dim = 1 if isinstance(inner, channels_first) else -1
        like = inner.weight
        c = like.shape[0]
        self.scale = nn.Parameter(torch.ones(c, dtype=like.dtype, device=like.device))
        self.shift = nn.Parameter(torch.zeros(c, dtype=like.dtype, device=like.device))
        if std > 0:
            nn.init.normal_(self.scale, 1.0, std)
            nn.init.normal_(self.shift, 0.0, std)

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped layer's weight, for models that read it for its dtype (HF ViT's patch embedding)."""
        return self.inner.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folds:
            n = self.inner
            w, b = n.weight * self.scale, n.bias * self.scale + self.shift
            if type(n) is nn.LayerNorm:
                return F.layer_norm(x, n.normalized_shape, w, b, n.eps)
            return torch.func.functional_call(n, {"weight": w, "bias": b}, (x,))
        y = self.inner(x)
        shape = [1] * y.ndim
        shape[self.channel_dim] = -1
        return y * self.scale.view(shape).to(y.dtype) + self.shift.view(shape).to(y.dtype)

    def frozen(self, x: torch.Tensor) -> torch.Tensor:
        """The output without the rescale (what PACE perturbs around)."""
        return self.inner(x)

    def merged(self) -> nn.Module:
        """The wrapped module with γ, β folded into its per-channel affine."""
        fold_channel_affine(self.inner, self.scale.detach(), self.shift.detach())
        return self.inner


def fold_channel_affine(module: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Make ``module(x)`` compute ``module(x)·scale + shift`` per output channel, in place."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if weight is None or bias is None:
        raise MergeError(f"{type(module).__name__} has no affine weight and bias to fold a scale/shift into")
    s = scale.to(weight.dtype)
    weight.mul_(s.view(-1, *[1] * (weight.ndim - 1)))
    bias.mul_(s).add_(shift.to(bias.dtype))


def inject_feature_rescale(model: nn.Module, modules: list[tuple[str, nn.Module]], std: float,
                           need_bias: bool = False) -> None:
    """Wrap every named module; with ``need_bias``, skip bias-free layers (ResNet convs), whose output
    a norm rescales next anyway, so the result stays mergeable."""
    for name, _ in modules:
        module = model.get_submodule(name)  # as it is now, after any replacement by the method
        if need_bias and is_weight_layer(module) and module.bias is None:
            continue
        replace(model, name, FeatureRescale(module, std))


def merge_feature_rescale(model: nn.Module) -> nn.Module:
    return merge_modules(model, FeatureRescale)


@dataclass
class SSFConfig:
    """SSF after every block linear and norm, the patch embedding and the final norm (paper defaults).

    targets / norms: regexes over module names overriding the discovered block layers / norms."""
    method: ClassVar[str] = "ssf"
    init_std: float = 0.02
    targets: str | None = None
    norms: str | None = None
    train_head: bool = True


def apply_ssf(model: nn.Module, cfg: SSFConfig) -> nn.Module:
    weights, norms, _ = resolve(model, cfg.targets, cfg.norms)
    freeze(model, cfg.train_head)
    inject_feature_rescale(model, weights + norms, cfg.init_std, need_bias=True)
    return model


def merge_ssf(model: nn.Module) -> nn.Module:
    merge_feature_rescale(model)
    return model


register(Method("ssf", SSFConfig, apply_ssf, merge_ssf))
