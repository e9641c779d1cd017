"""Where to adapt, found from a model's structure: one rule for timm, Hugging Face and plain modules.

Methods need to know which weight layers to adapt and which norms to rescale after.  Instead of a
table row per architecture, the structure says it:

* A **block** is a module that holds at least two weight layers (``nn.Linear`` / ``nn.Conv2d``) and a
  norm, and that repeats: an item of a container (a bare ``Sequential`` item too) or a class used more
  than once.  Blocks are the outermost such modules, except that a module whose own items are blocks
  (a Swin or ConvNeXt *stage*) is looked into, not taken whole.
* **Targets** are the weight layers inside blocks whose output reaches the logits (BEiT, EVA and timm
  Swin V2 read ``qkv.weight`` directly; such a layer is never called and cannot be wrapped), never
  the classifier.
* **Norms** are every norm inside each block except in its shortcut branch (``SHORTCUTS``), the last
  norm before the first block (the stem's output) and the norms after the last block (final norm); a
  stem without a norm has its last biased weight layer rescaled instead (ViT's patch embedding, as the
  official RLRR code does).  A norm has a per-channel affine scale (``affine_of``) through which alone
  its input reaches its output (``input_only_via_affine``), so that a rescale folds into plain weights.
* **Transitions** are the weight layers between blocks (Swin patch merging, ConvNeXt downsampling):
  adapted only on request, as the official Swin code's patch-merging option.

Call order, the input shape of each module and what reaches the logits come from one forward and
backward pass on a dummy input (the model's own input size) with hooks; a model whose input size is
unknown falls back to registration order and skips those checks.
The four families written by hand before (ViT/DeiT, Swin, ConvNeXt, ResNet) are tests of this rule.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

from .hf import config_input_size

log = logging.getLogger(__name__)

CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)

# What a linear does, by its leaf name (timm, HF ViT/Swin/DINOv2/CLIP/ConvNeXt, older HF names):
# LoRA's default "q and v" and the attention/MLP split of other methods read this.
ROLES = {"qkv": "qkv", "q": "q", "query": "q", "q_proj": "q", "k": "k", "key": "k", "k_proj": "k",
         "v": "v", "value": "v", "v_proj": "v", "proj": "proj", "o_proj": "proj", "out_proj": "proj",
         "fc1": "fc1", "pwconv1": "fc1", "fc2": "fc2", "pwconv2": "fc2"}



def role(name: str) -> str | None:
    """What a linear does, from its module name: ``ROLES`` by leaf name, and the BERT-style ``dense`` of
    HF Data2Vec / Swin V2 / DonutSwin / MobileViT by its parent (``attention.output.dense``: proj,
    ``intermediate.dense``: fc1, ``output.dense``: fc2)."""
    parts = name.split(".")
    if parts[-1] != "dense" or len(parts) < 2:
        return ROLES.get(parts[-1])
    if parts[-2] == "intermediate":
        return "fc1"
    if parts[-2] == "output":
        return "proj" if len(parts) > 2 and "attention" in parts[-3] else "fc2"
    return None


# Fig. 2's insertion sites: a weight layer's by its role, every rescaled norm's "norm".
SITES = ("attn", "mlp", "norm")
SITE_OF_ROLE = {"qkv": "attn", "q": "attn", "k": "attn", "v": "attn", "proj": "attn", "fc1": "mlp", "fc2": "mlp"}


class DiscoveryError(ValueError):
    """Nothing adaptable was found; the message names the ``targets=`` option."""


@dataclass(frozen=True)
class Structure:
    """What discovery found, by module name, in call order."""
    blocks: tuple[str, ...]
    targets: tuple[str, ...]  # weight layers inside blocks
    norms: tuple[str, ...]  # modules whose output is rescaled (norms, or the stem's weight layer)
    transitions: tuple[str, ...]  # weight layers between blocks
    stem: str | None  # the stem's rescale site, one of ``norms``
    order: tuple[str, ...]  # every module called in the dummy forward, in call order (registration order if none)


def conv_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """A Conv2d's padding as sizes: ``"valid"`` is 0 and ``"same"`` at stride 1 with an even
    ``dilation·(k-1)`` is the plain symmetric padding (HF EfficientNet's 1×1 convs); None when "same" is
    asymmetric, which an explicit size cannot express."""
    if not isinstance(conv.padding, str):
        return tuple(conv.padding)
    if conv.padding == "valid":
        return (0, 0)
    span = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
    return tuple(s // 2 for s in span) if all(s % 2 == 0 for s in span) else None


def is_weight_layer(m: nn.Module) -> bool:
    """A plain Linear or zero-padded Conv2d (subclasses with their own forward, e.g. ``Conv2dSame``,
    or ``nn.MultiheadAttention``'s out_proj, are read by weight elsewhere and cannot be wrapped)."""
    if type(m) is nn.Linear:
        return True
    return type(m) is nn.Conv2d and m.padding_mode == "zeros" and conv_padding(m) is not None


# A norm's per-channel affine, (scale, shift) by parameter name: torch/timm/HF norms, ResMLP's Affine.
AFFINE_NAMES = (("weight", "bias"), ("alpha", "beta"), ("gamma", "beta"))


def affine_of(m: nn.Module) -> tuple[str, str | None] | None:
    """Names of a norm's per-channel ``(scale, shift)`` parameters, shift None for a norm without one
    (RMSNorm, ``LayerNormNoBias``); None when ``m`` is no norm with a per-channel affine (what a rescale
    folds into).  A norm is a normalisation class or one named like it ("norm", "affine")."""
    kinds = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)
    name = type(m).__name__.lower()
    if not (isinstance(m, kinds) or "norm" in name or "affine" in name):
        return None
    own = dict(m.named_parameters(recurse=False))
    for scale, shift in AFFINE_NAMES:
        w, b = own.get(scale), own.get(shift)
        if w is None or w.numel() != max(w.shape, default=0) or (b is not None and b.shape != w.shape):
            continue  # not a per-channel vector (a 1-element or matrix parameter)
        if set(own) == {scale} | ({shift} if b is not None else set()):
            return scale, (shift if b is not None else None)
    return None


def is_norm(m: nn.Module) -> bool:
    """A normalisation layer with a per-channel affine scale (and maybe shift): see ``affine_of``."""
    return affine_of(m) is not None


def channel_dim(m: nn.Module) -> int:
    """Where a layer's channels are in its output: 1 for convolutions, BatchNorm, GroupNorm and the
    ``*2d`` norms (timm ``LayerNorm2d``), -1 (channels last) for Linear and token norms."""
    first = (nn.Conv2d, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
    return 1 if isinstance(m, first) or type(m).__name__.lower().endswith("2d") else -1


def input_only_via_affine(m: nn.Module, shape: tuple[int, ...]) -> bool:
    """Whether the norm's input reaches its output only through its affine (with scale and shift zero,
    the output no longer depends on the input), so that a rescale folded into the affine is the
    documented ``γ·norm(x) + β`` — before the activation of a norm-act layer (timm's ``BatchNormAct2d``).
    ConvNeXt-V2's GlobalResponseNorm adds its input back after its affine (``x + w·GRN(x) + b``): a
    rescale folded there would be another function, so it gets none."""
    scale, shift = affine_of(m)
    g = torch.Generator().manual_seed(0)
    like = getattr(m, scale)
    zero = {n: torch.zeros_like(getattr(m, n)) for n in (scale, shift) if n}
    was = m.training
    try:
        with torch.no_grad():  # in eval mode: a BatchNorm's running statistics must not move
            a, b = (torch.func.functional_call(m.eval(), zero, (torch.randn(shape, generator=g).to(like),))
                    for _ in range(2))
    finally:
        m.train(was)
    return bool(torch.allclose(a, b))


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
        size = config_input_size(config)
    if size is None:
        return None
    p = next(model.parameters(), None)
    like = dict(dtype=p.dtype, device=p.device) if p is not None else {}
    return torch.randn(1, *size, generator=torch.Generator().manual_seed(0)).to(**like)


@dataclass(frozen=True)
class Trace:
    """What one dummy forward shows: each module's first call (order), the input shape of each module,
    and the modules whose output never reaches the logits (SigLIP's unused pooling head)."""
    order: dict[str, int]
    shapes: dict[str, tuple[int, ...]]
    unused: frozenset[str]


def _first_tensor(out) -> torch.Tensor | None:
    """A module's main output: the tensor, or the first tensor of a tuple / HF output object."""
    if isinstance(out, torch.Tensor):
        return out
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    return next((t for t in items if isinstance(t, torch.Tensor)), None)


def trace(model: nn.Module) -> Trace | None:
    """One eval forward (with gradients, to see what reaches the logits) of the example input; None when
    the input size is unknown or the forward fails."""
    from .hf import logits_of
    x = example_input(model)
    if x is None:
        return None
    order: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    outs: dict[str, torch.Tensor] = {}

    def pre(name: str):
        def hook(_module, args) -> None:  # a pre-hook that returned a value would replace the input
            order.setdefault(name, len(order))
            if name not in shapes and args and isinstance(args[0], torch.Tensor):
                shapes[name] = tuple(args[0].shape)
        return hook

    def post(name: str):
        def hook(_module, _args, out) -> None:
            t = _first_tensor(out)
            if t is not None and t.requires_grad:
                outs.setdefault(name, t)
        return hook

    hooks = [h for n, m in model.named_modules()
             for h in (m.register_forward_pre_hook(pre(n)), m.register_forward_hook(post(n)))]
    was = model.training
    try:
        with torch.enable_grad():
            logits = logits_of(model.eval()(x.requires_grad_() * 1))  # not a leaf: in-place ops stay legal
            names = [n for n in outs if n]
            grads = torch.autograd.grad(logits.float().sum(), [outs[n] for n in names], allow_unused=True) \
                if names and logits.requires_grad else [0] * len(names)
    except Exception as e:  # noqa: BLE001 - any failure: fall back to registration order, and say what that skips
        log.warning("the structural trace of %s failed (%s: %s); its layers are taken in registration order, without "
                    "the checks that each reaches the logits and that norms only scale their input: pass --method-opt "
                    "targets=REGEX to choose the layers yourself", type(model).__name__, type(e).__name__,
                    (str(e).splitlines() or [""])[0][:120])
        return None
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return Trace(order, shapes, frozenset(n for n, g in zip(names, grads) if g is None))


def _items(model: nn.Module) -> set[str]:
    """Names of the items of containers (``ModuleList`` / ``Sequential`` / ``ModuleDict``)."""
    return {f"{n}.{c}" if n else c for n, m in model.named_modules() if isinstance(m, CONTAINERS)
            for c, _ in m.named_children()}


def find_blocks(model: nn.Module) -> list[str]:
    """Outermost repeated modules with ≥ 2 weight layers and a norm, looking into stages (see module doc)."""
    items = _items(model)
    counts: dict[type, int] = {}
    for m in model.modules():
        counts[type(m)] = counts.get(type(m), 0) + 1

    def candidate(name: str, m: nn.Module) -> bool:
        # a container is a block only as an item of another (ConvMixer's bare Sequential blocks), never
        # for being one of many Sequentials (a ResNet-D deep stem)
        repeated = name in items or (counts[type(m)] > 1 and not isinstance(m, CONTAINERS))
        if not repeated:
            return False
        mods = list(m.modules())
        return sum(map(is_weight_layer, mods)) >= 2 and any(map(is_norm, mods))

    def is_stage(name: str, m: nn.Module) -> bool:
        inner = [(n, c) for n, c in m.named_modules() if n and candidate(f"{name}.{n}", c)]
        kinds = [type(c) for _, c in inner]
        in_container = any(isinstance(m.get_submodule(n.rpartition(".")[0]) if "." in n else m, CONTAINERS)
                           for n, _ in inner)
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


# Sub-modules of a block that are its shortcut branch, by name (timm ``downsample``, HF ``shortcut``):
# the official code rescales the main path's norms, not the shortcut's.
SHORTCUTS = ("downsample", "shortcut", "skip")


def _own_norms(block: nn.Module) -> list[str]:
    """A block's norms, wherever they are nested (ConvNorm, Sequential main paths, parallel branches),
    except in its shortcut branch."""
    return [n for n, c in block.named_modules()
            if n and is_norm(c) and not any(part in SHORTCUTS for part in n.split(".")[:-1])]


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


def blocks_of(model: nn.Module) -> tuple[str, ...]:
    """The blocks of ``model``, also after a method wrapped its layers: a method's wrappers replace layers
    inside blocks, never blocks, so the structure found before (kept on the model) still names them."""
    kept = model.__dict__.get("_rlrr_structure")
    return kept[1].blocks if kept is not None else discover(model).blocks


def _discover(model: nn.Module) -> Structure:
    seen = trace(model)
    order = seen.order if seen is not None else None
    names = {n: i for i, (n, _) in enumerate(model.named_modules())}
    rank = (lambda n: order.get(n, -1)) if order is not None else names.get
    live = (lambda n: n in order and n not in seen.unused) if seen is not None else (lambda n: True)
    head_ids = {id(m) for h in classifier_modules(model) for m in h.modules()}
    blocks = [b for b in find_blocks(model) if live(b)]

    def within(n: str) -> bool:
        return holding_block(blocks, n) is not None

    mods = [(n, m) for n, m in model.named_modules() if n and live(n) and id(m) not in head_ids]
    targets = [n for n, m in mods if is_weight_layer(m) and within(n)]
    seq = tuple(sorted((n for n, _ in model.named_modules() if n and (order is None or n in order)), key=rank))
    if not blocks or not targets:
        return Structure(tuple(blocks), (), (), (), None, seq)
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
    if seen is not None:  # a rescale folds into a norm's affine only where the input passes through it
        norms = [n for n in norms if not is_norm(m := model.get_submodule(n)) or n not in seen.shapes
                 or input_only_via_affine(m, seen.shapes[n])]
    return Structure(tuple(blocks), tuple(sorted(targets, key=rank)), tuple(sorted(norms, key=rank)),
                     tuple(sorted(transitions, key=rank)), next((n for n in stem[-1:] if n in norms), None), seq)


def matching(model: nn.Module, pattern: str, option: str = "targets") -> list[tuple[str, nn.Module]]:
    """Modules whose full name matches ``pattern`` (anchored), skipping Identity placeholders; a pattern
    that is no regex is a one-line error naming the ``option`` it was given as."""
    try:
        rx = re.compile(rf"(?:{pattern})")
    except (re.error, TypeError) as e:
        raise DiscoveryError(f"{option}={pattern!r} is not a valid regular expression ({e}); fix it "
                             "(names are matched whole, e.g. 'blocks\\.\\d+\\.attn\\.qkv')") from None
    return [(n, m) for n, m in model.named_modules()
            if n and rx.fullmatch(n) and not isinstance(m, nn.Identity)]


def resolve(model: nn.Module, targets: str | None = None, norms: str | None = None,
            transitions: bool = False) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]],
                                                       Structure | None]:
    """(weight layers, norm-like modules, what discovery found) for a method: discovered, or the user's
    regexes.  ``targets`` / ``norms`` (regexes over module names) override discovery, which makes any
    ``nn.Module`` adaptable; discovery runs only for what is not given (None then).  ``transitions``:
    also the layers between blocks (Swin's patch merging).
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
            odd = sorted({type(m).__name__ for m in model.modules()
                          if isinstance(m, (nn.Linear, nn.Conv2d)) and not is_weight_layer(m)})
            why = (f"its weight layers are {', '.join(odd)}: subclasses with a forward of their own (weight "
                   "standardisation, asymmetric 'same' padding, ...) that read their weight directly and cannot be "
                   "wrapped" if odd else "found no repeated blocks of Linear/Conv2d layers with norms")
            raise DiscoveryError(f"{type(model).__name__}: {why}; pass targets=REGEX (CLI: --method-opt "
                                 "targets=REGEX) naming plain Linear/Conv2d layers to adapt")
    norm_mods = matching(model, norms, "norms") if norms is not None else [(n, model.get_submodule(n)) for n in found.norms]
    return weights, norm_mods, found


def holding_block(blocks: tuple[str, ...] | list[str], name: str) -> int | None:
    """Which of ``blocks`` (module names) holds the module ``name``; None outside every block."""
    return next((i for i, b in enumerate(blocks) if name.startswith(b + ".")), None)


def block_index(found: Structure):
    """``index(name)``: which block a module belongs to — the block holding it; outside every block, the
    first block called after it (the stem's to block 0, a Swin patch merging to the next stage's first
    block), else the last (the final norm).  The call order is indexed once for every name asked."""
    order = {n: i for i, n in enumerate(found.order)}
    starts = [order.get(b, -1) for b in found.blocks]

    def index(name: str) -> int:
        inside = holding_block(found.blocks, name)
        if inside is not None:
            return inside
        at = order.get(name, -1)
        return next((i for i, start in enumerate(starts) if start > at), len(found.blocks) - 1)
    return index


def block_choice(blocks: str | tuple[int, ...], count: int) -> set[int]:
    """Indices chosen by ``first:K`` / ``last:K`` / a list (negative from the end) among ``count`` blocks."""
    if isinstance(blocks, str):
        which, k = blocks.split(":")
        if int(k) > count:
            raise DiscoveryError(f"blocks={blocks!r}: the model has {count} blocks; pick K from 1 to {count}")
        return set(range(int(k))) if which == "first" else set(range(count - int(k), count))
    bad = [i for i in blocks if not -count <= i < count]
    if bad:
        raise DiscoveryError(f"blocks index {bad[0]} is out of range: the model has {count} blocks (0..{count - 1})")
    return {i % count for i in blocks}


def select(model: nn.Module, weights: list[tuple[str, nn.Module]], norms: list[tuple[str, nn.Module]],
           sites: tuple[str, ...] = SITES, blocks: str | tuple[int, ...] | None = None):
    """The weight layers and norms a method adapts, kept to ``sites`` (attention / MLP by role, norm) and to
    the chosen ``blocks`` of ``discover(model)``: the paper's Fig. 2 study on any model discovery reads."""
    both = "attn" in sites and "mlp" in sites  # then layers of no role (and patch mergings) are kept too
    if ("attn" in sites) != ("mlp" in sites):  # a layer between blocks (patch merging) is neither: dropped
        blocks_found = discover(model).blocks
        unknown = [n for n, _ in weights if role(n) not in SITE_OF_ROLE and holding_block(blocks_found, n) is not None]
        if unknown:
            raise DiscoveryError(f"sites={','.join(sites)} needs to tell attention from MLP layers, but "
                                 f"{type(model).__name__}'s {unknown[0]} ({len(unknown)} such) is neither by name; "
                                 "keep both attn and mlp, or pick layers with targets=REGEX")
    weights = [(n, m) for n, m in weights if both or SITE_OF_ROLE.get(role(n)) in sites]
    norms = norms if "norm" in sites else []
    if blocks is not None:
        found = discover(model)
        if not found.blocks:
            raise DiscoveryError(f"blocks= needs repeated blocks, and none were found in {type(model).__name__}; "
                                 "pick layers with targets=REGEX instead")
        keep, index = block_choice(blocks, len(found.blocks)), block_index(found)
        weights = [(n, m) for n, m in weights if index(n) in keep]
        norms = [(n, m) for n, m in norms if index(n) in keep]
    if not weights and not norms:
        raise DiscoveryError(f"sites={','.join(sites)} with blocks={blocks!r} leaves nothing to adapt in "
                             f"{type(model).__name__}")
    return weights, norms
