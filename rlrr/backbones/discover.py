"""Where to adapt, found from a model's structure: one rule for timm, Hugging Face and plain modules.

Methods need to know which weight layers to adapt and which norms to rescale after.  Instead of a
table row per architecture, the structure says it:

* A **block** is a module that holds at least two weight layers (``nn.Linear`` / ``nn.Conv2d``) and a
  norm, and that repeats: an item of a ``ModuleList``/``Sequential`` or a class used more than once.
  Blocks are the outermost such modules, except that a module whose own items are blocks (a Swin or
  ConvNeXt *stage*) is looked into, not taken whole.
* **Targets** are the weight layers inside blocks that the forward pass really calls (BEiT and EVA read
  ``qkv.weight`` directly; such a layer cannot be wrapped), never the classifier.
* **Norms** are each block's own norms (not those inside a nested ``Sequential`` such as a ResNet
  shortcut), the last norm before the first block (the stem's output) and the norms after the last
  block (final norm); a stem without a norm has its last biased weight layer rescaled instead (ViT's
  patch embedding, as the official RLRR code does).  Norms need an affine weight and bias, so that a
  rescale after them folds into plain weights.
* **Transitions** are the weight layers between blocks (Swin patch merging, ConvNeXt downsampling):
  adapted only on request, as the official Swin code's patch-merging option.

Call order comes from one forward pass on a dummy input (the model's own input size) with hooks; a
model whose input size is unknown falls back to registration order and skips the called-check.
The four families written by hand before (ViT/DeiT, Swin, ConvNeXt, ResNet) are tests of this rule.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)

# What a linear does, by its leaf name (timm, HF ViT/Swin/DINOv2/CLIP/ConvNeXt, older HF names):
# LoRA's default "q and v" and the attention/MLP split of other methods read this.
ROLES = {"qkv": "qkv", "q": "q", "query": "q", "q_proj": "q", "k": "k", "key": "k", "k_proj": "k",
         "v": "v", "value": "v", "v_proj": "v", "proj": "proj", "o_proj": "proj", "out_proj": "proj",
         "fc1": "fc1", "pwconv1": "fc1", "fc2": "fc2", "pwconv2": "fc2"}

# The official RLRR Swin code shares one s_r over a fused qkv; everywhere else q, k, v are three maps.
FUSED_QKV_CLASSES = ("SwinTransformer", "SwinTransformerV2")


class DiscoveryError(ValueError):
    """Nothing adaptable was found; the message names the ``targets=`` option."""


@dataclass(frozen=True)
class Structure:
    """What discovery found, by module name, in call order."""
    blocks: tuple[str, ...]
    targets: tuple[str, ...]  # weight layers inside blocks
    norms: tuple[str, ...]  # modules whose output is rescaled (norms, or the stem's weight layer)
    transitions: tuple[str, ...]  # weight layers between blocks
    qkv: str  # default treatment of a fused qkv: "split" or "fused"
    order: tuple[str, ...]  # every module called in the dummy forward, in call order (registration order if none)


def is_weight_layer(m: nn.Module) -> bool:
    """A plain Linear or zero-padded Conv2d (subclasses with their own forward, e.g. ``Conv2dSame``,
    or ``nn.MultiheadAttention``'s out_proj, are read by weight elsewhere and cannot be wrapped)."""
    if type(m) is nn.Linear:
        return True
    return type(m) is nn.Conv2d and m.padding_mode == "zeros" and not isinstance(m.padding, str)


def is_norm(m: nn.Module) -> bool:
    """A normalisation layer with a per-channel affine weight and bias (what a rescale folds into)."""
    kinds = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)
    if not (isinstance(m, kinds) or "norm" in type(m).__name__.lower()):
        return False
    w, b = getattr(m, "weight", None), getattr(m, "bias", None)
    return (isinstance(w, nn.Parameter) and isinstance(b, nn.Parameter) and w.ndim == 1 and w.shape == b.shape
            and not any(True for _ in m.parameters(recurse=False) if _ is not w and _ is not b))


def classifier_modules(model: nn.Module) -> list[nn.Module]:
    """The task head(s): timm's ``get_classifier()``, else HF's ``classifier`` (DeiT: two heads)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if head is None:
        head = [getattr(model, a) for a in ("classifier", "cls_classifier", "distillation_classifier")
                if isinstance(getattr(model, a, None), nn.Module)]
    heads = head if isinstance(head, (tuple, list)) else [head]
    return [h for h in heads if isinstance(h, nn.Module) and not isinstance(h, nn.Identity)]


def example_input(model: nn.Module) -> torch.Tensor | None:
    """A one-image batch of the model's input size (timm ``pretrained_cfg`` or patch embedding, HF
    ``config``), or None when the model does not say."""
    size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)  # timm: the size actually built
    if size is not None and isinstance(built, (tuple, list)):
        size = (size[0], *built)
    config = getattr(model, "config", None)
    if size is None and config is not None:
        vision = getattr(config, "vision_config", None) or config
        side = getattr(vision, "image_size", None)
        side = side if isinstance(side, (tuple, list)) else (side or 224, side or 224)
        size = (getattr(vision, "num_channels", 3), *side)
    if size is None:
        return None
    p = next(model.parameters(), None)
    like = dict(dtype=p.dtype, device=p.device) if p is not None else {}
    return torch.randn(1, *size, generator=torch.Generator().manual_seed(0)).to(**like)


def call_order(model: nn.Module) -> dict[str, int] | None:
    """Module name -> index of its first call in one no-grad eval forward; None if it cannot run."""
    x = example_input(model)
    if x is None:
        return None
    order: dict[str, int] = {}

    def seen(name: str):
        def hook(_module, _args) -> None:  # a pre-hook that returned a value would replace the input
            order.setdefault(name, len(order))
        return hook

    hooks = [m.register_forward_pre_hook(seen(n)) for n, m in model.named_modules()]
    was = model.training
    try:
        with torch.no_grad():
            model.eval()(x)
    except Exception:  # noqa: BLE001 - any failure just means: fall back to registration order
        return None
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return order


def _repeats(model: nn.Module) -> set[str]:
    """Names of modules that repeat: items of a container, or of a class used more than once."""
    counts: dict[type, int] = {}
    for m in model.modules():
        counts[type(m)] = counts.get(type(m), 0) + 1
    out = {f"{n}.{c}" if n else c for n, m in model.named_modules() if isinstance(m, CONTAINERS)
           for c, _ in m.named_children()}
    return out | {n for n, m in model.named_modules() if n and counts[type(m)] > 1}


def find_blocks(model: nn.Module) -> list[str]:
    """Outermost repeated modules with ≥ 2 weight layers and a norm, looking into stages (see module doc)."""
    repeats = _repeats(model)

    def candidate(name: str, m: nn.Module) -> bool:
        if name not in repeats or isinstance(m, CONTAINERS):
            return False
        mods = list(m.modules())
        return sum(map(is_weight_layer, mods)) >= 2 and any(map(is_norm, mods))

    def is_stage(name: str, m: nn.Module) -> bool:
        inner = [(n, c) for n, c in m.named_modules() if n and candidate(f"{name}.{n}", c)]
        kinds = [type(c) for _, c in inner]
        in_container = any(isinstance(m.get_submodule(n.rpartition(".")[0]), CONTAINERS) for n, _ in inner if "." in n)
        return in_container or len(kinds) != len(set(kinds))

    blocks: list[str] = []

    def visit(prefix: str, m: nn.Module) -> None:
        for name, child in m.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if candidate(full, child) and not is_stage(full, child):
                blocks.append(full)
            else:
                visit(full, child)

    visit("", model)
    return blocks


def _own_norms(block: nn.Module) -> list[str]:
    """A block's norms, skipping those inside a nested container (a ResNet shortcut's BatchNorm)."""
    nested = [n for n, c in block.named_modules() if n and isinstance(c, CONTAINERS)]
    return [n for n, c in block.named_modules()
            if n and is_norm(c) and not any(n.startswith(p + ".") for p in nested)]


def discover(model: nn.Module) -> Structure:
    """Blocks, targets, norms and transitions of ``model`` by the rule in the module docstring.

    Kept on the model, keyed by its module tree (every name and class), so the per-phase copies the
    trainer makes and the several methods that ask reuse one dummy forward; a changed tree (a method
    applied, a head replaced) is discovered again."""
    tree = tuple((n, type(m)) for n, m in model.named_modules())
    kept = model.__dict__.get("_rlrr_structure")
    if kept is None or kept[0] != tree:
        kept = model.__dict__["_rlrr_structure"] = (tree, _discover(model))
    return kept[1]


def _discover(model: nn.Module) -> Structure:
    order = call_order(model)
    names = {n: i for i, (n, _) in enumerate(model.named_modules())}
    rank = (lambda n: order.get(n, -1)) if order is not None else names.get
    live = (lambda n: n in order) if order is not None else (lambda n: True)
    head_ids = {id(m) for h in classifier_modules(model) for m in h.modules()}
    blocks = [b for b in find_blocks(model) if live(b)]

    def within(n: str) -> str | None:
        return next((b for b in blocks if n.startswith(b + ".")), None)

    mods = [(n, m) for n, m in model.named_modules() if n and live(n) and id(m) not in head_ids]
    targets = [n for n, m in mods if is_weight_layer(m) and within(n)]
    seq = tuple(sorted((n for n, _ in model.named_modules() if n and live(n)), key=rank))
    if not blocks or not targets:
        return Structure(tuple(blocks), (), (), (), "split", seq)
    inside = [rank(n) for n, _ in mods if within(n)]
    lo, hi = min(inside), max(inside)
    block_norms = [f"{b}.{n}" for b in blocks for n in _own_norms(model.get_submodule(b))]
    outside = [(n, m) for n, m in mods if not within(n) and not any(b.startswith(n + ".") or b == n for b in blocks)]
    stem = [n for n, m in outside if rank(n) < lo and is_norm(m)]
    if not stem:
        stem = [n for n, m in outside if rank(n) < lo and is_weight_layer(m) and m.bias is not None]
    final = [n for n, m in outside if rank(n) > hi and is_norm(m)]
    transitions = [n for n, m in outside if lo < rank(n) < hi and is_weight_layer(m)]
    norms = [n for n in block_norms if live(n)] + stem[-1:] + final
    qkv = "fused" if type(model).__name__ in FUSED_QKV_CLASSES else "split"
    return Structure(tuple(blocks), tuple(sorted(targets, key=rank)), tuple(sorted(norms, key=rank)),
                     tuple(sorted(transitions, key=rank)), qkv, seq)


def matching(model: nn.Module, pattern: str) -> list[tuple[str, nn.Module]]:
    """Modules whose full name matches ``pattern`` (anchored), skipping Identity placeholders."""
    rx = re.compile(rf"(?:{pattern})")
    return [(n, m) for n, m in model.named_modules()
            if n and rx.fullmatch(n) and not isinstance(m, nn.Identity)]


def resolve(model: nn.Module, targets: str | None = None, norms: str | None = None,
            transitions: bool = False) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]], str]:
    """(weight layers, norm-like modules, default qkv) for a method: discovered, or the user's regexes.

    ``targets`` / ``norms`` (regexes over module names) override discovery, which makes any
    ``nn.Module`` adaptable; discovery runs only for what is not given.
    """
    found = discover(model) if targets is None or norms is None else None
    if targets is not None:
        weights = matching(model, targets)
        if not weights:
            raise DiscoveryError(f"no module of {type(model).__name__} matches targets={targets!r}; "
                                 "check the names with model.named_modules()")
    else:
        names = list(found.targets) + (list(found.transitions) if transitions else [])
        weights = [(n, model.get_submodule(n)) for n in names]
        if not weights:
            raise DiscoveryError(f"found no repeated blocks of Linear/Conv2d layers with norms in "
                                 f"{type(model).__name__}; pass targets=REGEX (CLI: --method-opt targets=REGEX) "
                                 "naming the layers to adapt")
    norm_mods = matching(model, norms) if norms is not None else [(n, model.get_submodule(n)) for n in found.norms]
    return weights, norm_mods, (found.qkv if found else "split")
