"""The small interface every fine-tuning method shares, and the helpers they share.

A method is a config dataclass (with a ``method`` name) plus two functions:
``apply(model, config)`` injects its modules in place and sets ``requires_grad`` so that exactly
its parameters (and, usually, the classifier head) train; ``merge(model)`` folds them back into the
plain timm architecture (or raises ``MergeError`` when the method cannot be merged).
Everything else — listing trainable parameters, saving and loading adapters, summaries — is
generic and lives here or in ``rlrr.adapter``, so the trainer never needs to know which method runs.
Modules a method adds declare their new parameters in ``adapter_params`` so they can be counted.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..backbones.discover import classifier_modules
from ..config import check_fields


class MergeError(RuntimeError):
    """The method (or this particular model) cannot be folded into plain weights."""


class NotServable(ValueError):
    """A layer's adapter cannot be served per sample by a bank (``bank_rows`` of an ablation variant)."""


@dataclass(frozen=True)
class Method:
    name: str
    config: type
    apply: Callable[[nn.Module, Any], nn.Module]
    merge: Callable[[nn.Module], nn.Module] | None  # None: not mergeable (e.g. VPT prompts)


METHODS: dict[str, Method] = {}


@dataclass(frozen=True)
class Composed:
    """A family of method names built from others (``peft:<tuner>``, ``<method>+pace``), registered by the
    module that builds them so this interface never imports them: ``matches(name)``, then the ``method``
    and the ``config`` (from plain values) for that name."""
    matches: Callable[[str], bool]
    method: Callable[[str], Method]
    config: Callable[[str, dict], Any]


COMPOSED: list[Composed] = []


def register(method: Method | Composed) -> Method | Composed:
    if isinstance(method, Composed):
        COMPOSED.append(method)
    else:
        METHODS[method.name] = method
    return method


def composed(name: str) -> Composed | None:
    return next((c for c in COMPOSED if c.matches(name)), None)


def get_method(name: str) -> Method:
    """A registered method, or a composed one (``peft:<tuner>``, ``<method>+pace``).  Every method registers
    when ``rlrr.methods`` is imported, which importing this module does first."""
    family = composed(name)
    if family is not None:
        return family.method(name)
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}, peft:<tuner> or "
                       "<method>+pace")
    return METHODS[name]


def make_config(name: str, **overrides: Any):
    """A method's config from plain values (YAML/CLI/adapter metadata), rejecting unknown keys by name."""
    get_method(name)  # an unknown or impossible name (PACE twice, PACE around peft) is refused first
    family = composed(name)
    if family is not None:
        return family.config(name, overrides)
    cls = get_method(name).config
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f"{name} has no option(s) {sorted(unknown)}; known: {sorted(fields)}")
    return cls(**check_fields(cls, overrides, f"{name} option"))


def apply(model: nn.Module, config: Any) -> nn.Module:
    """Inject the method described by ``config`` (an instance of a registered config dataclass)."""
    if getattr(model, "rlrr_method", None):
        raise RuntimeError(f"model already has method {model.rlrr_method!r} applied; create a fresh backbone")
    method = get_method(config.method)
    from ..backbones import fingerprint
    model.backbone_fingerprint = getattr(model, "backbone_fingerprint", None) or fingerprint(model)  # before any change
    model = method.apply(model, config)
    model.rlrr_method, model.rlrr_config = method.name, config
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold the applied method into plain weights; the result has the original timm module types."""
    name = getattr(model, "rlrr_method", None)
    if name is None:
        raise MergeError("no method applied to this model; nothing to merge")
    method = get_method(name)
    if method.merge is None:
        raise MergeError(f"{name} adds computation that has no plain-weight equivalent; it cannot be merged")
    with torch.no_grad():
        model = method.merge(model)
    for attr in ("rlrr_method", "rlrr_config", "backbone_fingerprint"):
        model.__dict__.pop(attr, None)
    return model


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0):
    """The default training objective, ``(loss, logits)``; a method may set ``model.objective`` to its own."""
    from ..backbones.hf import logits_of
    logits = logits_of(model(x))
    return torch.nn.functional.cross_entropy(logits.float(), y, label_smoothing=label_smoothing), logits


# --- shared helpers for method implementations ----------------------------------------------------
def freeze(model: nn.Module, train_head: bool = True) -> None:
    """Freeze everything, then unfreeze the classifier head (the new task's layer)."""
    model.requires_grad_(False)
    if train_head:
        for head in classifier_modules(model):
            head.requires_grad_(True)


class Wrapper(nn.Module):
    """A module that wraps another (``self.<wrapped>``) and answers, for model code, the attributes of the
    layer it replaced: ``weight`` for its dtype (HF ViT), ``in_features``, a conv's ``stride`` (TF-style
    padding), ... — whatever the wrapper does not define itself comes from the wrapped module."""

    wrapped = "base"

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == self.wrapped:
                raise
            return getattr(super().__getattr__(self.wrapped), name)


class AroundLinear(Wrapper):
    """A frozen ``base`` Linear plus a method's update: what the LoRA, HTA and APLA layers share."""

    channel_dim = -1

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base.requires_grad_(False)

    def frozen(self, x: torch.Tensor) -> torch.Tensor:
        """The pretrained layer's output (what PACE perturbs around)."""
        return self.base(x)


def add_to_rows(y: torch.Tensor, slices: list[tuple[int, int]], parts: list[torch.Tensor]) -> torch.Tensor:
    """``y`` plus each update in ``parts`` added to its slice ``(start, stop)`` of the output channels:
    how methods adapt q, k, v as row slices of timm's fused qkv (LoRA, HTA)."""
    if slices == [(0, y.shape[-1])]:
        return y + parts[0]
    pieces, last = [], 0
    for (a, b), p in zip(slices, parts):  # zeros where a row slice has no update
        pieces += [y.new_zeros(*y.shape[:-1], a - last), p]
        last = b
    pieces.append(y.new_zeros(*y.shape[:-1], y.shape[-1] - last))
    return y + torch.cat(pieces, dim=-1)


def merge_modules(model: nn.Module, *types: type) -> nn.Module:
    """Replace every module of ``types`` by its ``merged()`` plain layer: how mergeable methods fold."""
    for name, module in list(model.named_modules()):
        if isinstance(module, types):
            replace(model, name, module.merged())
    return model


def replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def added_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters that a method introduced (declared by its modules' ``adapter_params``)."""
    out = {}
    for mname, module in model.named_modules():
        for pname in getattr(module, "adapter_params", ()):
            p = getattr(module, pname, None) if "." not in pname else module.get_parameter(pname)
            if isinstance(p, nn.Parameter):
                out[f"{mname}.{pname}" if mname else pname] = p
        for attr in getattr(module, "adapter_layer_names", ()):  # peft's tuner layers name theirs here
            sub = getattr(module, attr, None)
            for pname, p in (sub.named_parameters() if isinstance(sub, nn.Module) else ()):
                out[f"{mname}.{attr}.{pname}"] = p
    return out


def summary(model: nn.Module) -> dict[str, float]:
    """Counts a user wants beside a result: method params, head params, trainable total, % of backbone."""
    added = added_parameters(model)
    head_ids = {id(p) for h in classifier_modules(model) for p in h.parameters()}
    all_params = list(model.parameters())
    backbone = sum(p.numel() for p in all_params if id(p) not in head_ids) - sum(p.numel() for p in added.values())
    trainable = sum(p.numel() for p in all_params if p.requires_grad)
    head = sum(p.numel() for p in all_params if id(p) in head_ids and p.requires_grad)
    return {"method": getattr(model, "rlrr_method", None) or "none", "method_params": trainable - head,
            "added_params": sum(p.numel() for p in added.values()), "head_params": head,
            "trainable_params": trainable, "backbone_params": backbone,
            "trainable_pct_of_backbone": 100.0 * trainable / max(backbone, 1)}


def format_summary(s: dict[str, float]) -> str:
    return (f"{s['method']}: {s['method_params']:,} method + {s['head_params']:,} head = "
            f"{s['trainable_params']:,} trainable ({s['trainable_pct_of_backbone']:.3f}% of a "
            f"{s['backbone_params']:,}-parameter backbone)")
