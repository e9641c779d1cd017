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

from ..backbones.discover import affine_of, channel_dim, is_weight_layer, resolve
from .base import Method, MergeError, Wrapper, freeze, merge_modules, register, replace


class FeatureRescale(Wrapper):
    """``inner(x) · γ + β`` per channel, with γ ~ N(1, σ), β ~ N(0, σ) (σ = 0 gives the identity).

    After a norm, γ and β fold into its affine at every call (``w·γ``, ``b·γ + β``): the same function,
    but the norm's own backward yields their gradients from the statistics it keeps anyway, so the
    rescale stores no activation of its own, and it also sits right where a norm-act layer
    (timm's ``BatchNormAct2d``) applies its affine, before the activation, so it always merges.
    After a Linear/Conv2d the output is scaled (cheaper than scaling the weight, whose gradient would
    cost a GEMM).  A norm without a shift (RMSNorm, ``LayerNormNoBias``) gets the scale γ only.
    """

    adapter_params = ("scale", "shift")
    wrapped = "inner"

    def __init__(self, inner: nn.Module, std: float = 0.02):
        super().__init__()
        self.affine = affine_of(inner)  # (scale, shift) parameter names of a norm folded into; None: a layer
        if self.affine is None and not is_weight_layer(inner):
            raise TypeError(f"cannot rescale the output of a {type(inner).__name__}; name norms with a per-channel "
                            "affine, or Linear/Conv2d layers")
        self.inner = inner
        self.channel_dim = channel_dim(inner)
        like = getattr(inner, self.affine[0]) if self.affine else inner.weight
        c = like.numel() if self.affine else like.shape[0]
        self.scale = nn.Parameter(torch.ones(c, dtype=like.dtype, device=like.device))
        # a norm without a shift of its own (RMSNorm) is only scaled: a shift would have nowhere to merge
        self.shift = nn.Parameter(torch.zeros(c, dtype=like.dtype, device=like.device)) \
            if self.affine is None or self.affine[1] else None
        if std > 0:
            nn.init.normal_(self.scale, 1.0, std)
            if self.shift is not None:
                nn.init.normal_(self.shift, 0.0, std)

    def folded(self) -> dict[str, torch.Tensor]:
        """The wrapped norm's affine with γ, β folded in, by parameter name (``w·γ``, ``b·γ + β``): what
        forward runs the norm with, what ``merged`` writes and what a bank stacks per task."""
        n, (w_name, b_name) = self.inner, self.affine
        folded = {w_name: getattr(n, w_name) * self.scale.view(getattr(n, w_name).shape)}
        if b_name:
            b = getattr(n, b_name)
            folded[b_name] = b * self.scale.view(b.shape) + self.shift.view(b.shape)
        return folded

    def bank_rows(self) -> tuple[str, dict[str, torch.Tensor]]:
        """What a bank of adapters stacks for this rescale: the folded affine at a norm site, or, after a
        weight layer, the output affine ``(x Wᵀ)·γ + (b·γ + β)`` at a weight site."""
        gamma = self.scale.detach()
        if self.affine:
            folded = [t.reshape(-1) for t in self.folded().values()]
            return "norm", {"gamma": folded[0], **({"bias": folded[1]} if len(folded) > 1 else {})}
        bias = self.inner.bias * gamma + self.shift if self.inner.bias is not None else self.shift
        return "weight", {"gamma": gamma, "bias": bias}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.affine:
            n, folded = self.inner, self.folded()
            if type(n) is nn.LayerNorm:
                return F.layer_norm(x, n.normalized_shape, folded["weight"], folded.get("bias"), n.eps)
            return torch.func.functional_call(n, folded, (x,))
        y = self.inner(x)
        shape = [1] * y.ndim
        shape[self.channel_dim] = -1
        return y * self.scale.view(shape).to(y.dtype) + self.shift.view(shape).to(y.dtype)

    def frozen(self, x: torch.Tensor) -> torch.Tensor:
        """The output without the rescale (what PACE perturbs around)."""
        return self.inner(x)

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The wrapped module with γ, β folded into its per-channel affine (a norm's, or a layer's output rows)."""
        if self.affine:
            for name, value in self.folded().items():
                getattr(self.inner, name).copy_(value)
        else:
            fold_output_affine(self.inner, self.scale, self.shift)
        return self.inner


def fold_output_affine(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Make a Linear/Conv2d compute ``layer(x)·scale + shift`` per output channel, in place (its weight rows
    scaled, its bias scaled and shifted)."""
    if layer.bias is None:
        raise MergeError(f"{type(layer).__name__} has no bias to fold a shift into")
    layer.weight.mul_(scale.to(layer.weight.dtype).view(-1, *[1] * (layer.weight.ndim - 1)))
    layer.bias.mul_(scale.to(layer.bias.dtype)).add_(shift.to(layer.bias.dtype))


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
