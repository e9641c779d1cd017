"""Backbones: timm creation and local weight files here; Hugging Face models in ``hf``; where to
adapt, discovered from structure, in ``discover``.  Everything else about a model is timm's (or
transformers') business.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path

import timm
import torch
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer, _load_weights

from .discover import classifier_modules
from .errors import BackboneError
from .hf import PREFIX, create_hf, is_hf, logits_of, reset_hf_classifier  # noqa: F401 - logits_of: re-exported

log = logging.getLogger(__name__)


def architecture(model: torch.nn.Module) -> str:
    """The name a model was created from (stored in adapter metadata): timm's architecture, or
    ``hf:<hub id or folder>`` for a transformers model."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("architecture"):
        return cfg["architecture"]
    if is_hf(model):
        return PREFIX + model.config._name_or_path
    return type(model).__name__


def fingerprint(model: torch.nn.Module) -> str:
    """A hash of the backbone's weights (every parameter but the classifier: names, shapes, dtypes, bytes).

    Adapters record it, so loading one onto other weights — another checkpoint of the same architecture,
    or a swapped or poisoned backbone — is caught.  blake2b streams ViT-B's 344 MB in well under a second.
    """
    head = {id(p) for h in classifier_modules(model) for p in h.parameters()}
    h = hashlib.blake2b(digest_size=16)
    for name, p in model.named_parameters():
        if id(p) in head:
            continue
        t = p.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
        h.update(memoryview(t.view(torch.uint8).numpy()))
    return h.hexdigest()


def set_num_classes(model: torch.nn.Module, num_classes: int) -> None:
    """Give the model a fresh classifier for ``num_classes`` (timm ``reset_classifier`` or the HF head)."""
    if is_hf(model):
        reset_hf_classifier(model, num_classes)
    else:
        model.reset_classifier(num_classes)


# --- the embedded offline backbone -------------------------------------------------------------
EMBEDDED_NAME = "vit_pico_patch4_32"
EMBEDDED_DIR = Path(__file__).parent.parent / "weights"  # <model>.fractal.safetensors: ``rlrr pretrain``'s output
SMALL_VITS: set[str] = set()  # the names below: their "pretrained" is a file in EMBEDDED_DIR or nothing


def _embedded(fn):
    """``register_model`` for our own small ViTs, noting the name (SMALL_VITS)."""
    SMALL_VITS.add(fn.__name__)
    return register_model(fn)


def _small_vit(name: str, embed_dim: int, depth: int, num_heads: int, **kwargs) -> VisionTransformer:
    """A ViT on 32×32 input in 4×4 patches (64 tokens), normalised to [-1, 1] like its fractal pre-training."""
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm factory extras
        kwargs.pop(key, None)
    cfg = dict(img_size=32, patch_size=4, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=4.0)
    model = VisionTransformer(**{**cfg, **kwargs})
    model.pretrained_cfg = {"architecture": name, "input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5),
                            "std": (0.5, 0.5, 0.5), "interpolation": "bilinear", "crop_pct": 1.0,
                            "num_classes": kwargs.get("num_classes", 1000), "classifier": "head"}
    return model


@_embedded
def vit_pico_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A ViT small enough to pre-train and fine-tune on a 2-core CPU: width 128, depth 6 (1.2 M parameters).
    The project pre-trains it on fractals (``rlrr pretrain``) and ships it."""
    return _small_vit(EMBEDDED_NAME, 128, 6, 4, **kwargs)


@_embedded
def vit_nano_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Ti's width (192, 3 heads) at pico's depth: 2.7 M parameters, about twice pico's cost per image —
    a larger candidate for the proxy suite's backbone (benchmarks/proxy_backbones.sh); no weights shipped."""
    return _small_vit("vit_nano_patch4_32", 192, 6, 3, **kwargs)


# --- weights ----------------------------------------------------------------------------------
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def weights_file(path: str | Path) -> Path:
    """``path`` itself, or for a folder (a Hugging Face repo downloaded with ``huggingface-cli download
    timm/<name> --local-dir DIR``) the weights file in it, by the names the Hub repos use."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return path
    found = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
    if found is None:
        raise BackboneError(f"weights folder {path} holds none of {', '.join(WEIGHT_FILES)}; pass the weights file "
                            "itself (.safetensors, .pth or .npz)")
    return found


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file or a pickle-free torch checkpoint (``weights_only=True``)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise BackboneError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0][:120]}); "
                                "it may be truncated: download it again") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise BackboneError(f"{path} is not a weights-only torch checkpoint ({type(e).__name__}); "
                            "convert it to .safetensors or save a plain state_dict") from None
    for key in ("model", "state_dict", "model_state", "module", "teacher"):  # teacher: DINO's full checkpoint
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    return encoder_of({k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)})


# Self-supervised checkpoints keep the backbone under a prefix beside what pre-training alone needs:
# MoCo v3's base encoder (its momentum encoder and predictor beside it, a projection MLP as its `head`),
# DINO's teacher backbone (its projection `head` beside it).
ENCODER_PREFIXES = ("base_encoder.", "backbone.")


def encoder_of(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone of a self-supervised checkpoint in its released layout (MoCo v3, DINO, MAE), as the
    plain timm keys; the pre-training heads (projection MLPs, MAE's decoder and mask token) are dropped,
    since fine-tuning puts a new classifier there.  Other state dicts pass through unchanged."""
    prefix = next((p for p in ENCODER_PREFIXES if any(k.startswith(p) for k in sd)), None)
    if prefix is not None:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and not k.startswith(prefix + "head.")}
    if any(k.startswith("decoder_") for k in sd):  # MAE pre-training: encoder + decoder in one dict
        sd = {k: v for k, v in sd.items() if not (k.startswith("decoder_") or k == "mask_token")}
    return sd


def num_classes_of(model: torch.nn.Module) -> int | None:
    """The class count of a model's head: timm's ``num_classes``, HF's ``config.num_labels`` (a peft
    wrapper answers for the model inside)."""
    n = getattr(model, "num_classes", None)
    return n if isinstance(n, int) else getattr(getattr(model, "config", None), "num_labels", None)


def checkpoint_num_classes(name: str, tensors: dict[str, torch.Tensor]) -> int | None:
    """Class count of the classifier stored in ``tensors`` (an adapter or a merged checkpoint) for
    model ``name``, found under the classifier name timm records for it (HF: ``classifier``), also inside
    a peft adapter (``base_model.model.<head>``); None without a head."""
    tensors = {k.removeprefix("base_model.model."): v for k, v in tensors.items()}
    if name.startswith(PREFIX):
        head = tensors.get("classifier.weight", tensors.get("cls_classifier.weight"))
        return None if head is None else head.shape[0]
    cfg = timm.models.get_pretrained_cfg(name)
    cls_name = getattr(cfg, "classifier", None) or "head"
    head = tensors.get(f"{cls_name}.weight", tensors.get("head.weight", tensors.get("fc.weight")))
    return None if head is None else head.shape[0]


def pooled_by_average(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> bool:
    """A ViT checkpoint fine-tuned with global average pooling (MAE's and BEiT-style fine-tuned weights keep
    ``fc_norm`` and no final ``norm``) given to a ViT built for the class token: it should be built with
    ``global_pool="avg"`` so its weights load where they were trained."""
    return (isinstance(model, VisionTransformer) and isinstance(model.fc_norm, torch.nn.Identity)
            and "fc_norm.weight" in sd and "norm.weight" not in sd)


def load_weights(model: torch.nn.Module, path: str | Path, sd: dict[str, torch.Tensor] | None = None) -> None:
    """Load a local checkpoint (or its state dict ``sd``, already read) into a freshly created timm model.

    Google's ViT ``.npz`` goes through timm's own npz reader; other files go through the model
    module's ``checkpoint_filter_fn`` (key remapping, position-embedding resizing) when timm has one.
    A classifier of a different size is left at its fresh init: that is the fine-tuning case.
    """
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weights file {path} not found; pass an existing .safetensors, .pth or .npz path "
                            "(or a folder holding model.safetensors)")
    if path.suffix == ".npz":
        if not isinstance(model, VisionTransformer):
            raise BackboneError(f"{path}: .npz checkpoints are Google's ViT format; use a ViT model or a .safetensors file")
        try:
            _load_weights(model, str(path))
        except (KeyError, ValueError, RuntimeError) as e:
            raise BackboneError(f"{path} does not fit {architecture(model)} in Google's ViT layout "
                                f"({str(e).splitlines()[0][:200]}); use the .npz of the matching ViT size") from None
        return
    sd = read_state_dict(path) if sd is None else sd
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            sd = filter_fn(sd, model)
        except Exception as e:  # noqa: BLE001 - fall back to the raw keys, checked strictly below
            log.warning("timm's checkpoint filter for %s did not take %s (%s: %s); loading its keys as they are",
                        architecture(model), path, type(e).__name__, (str(e).splitlines() or [""])[0][:120])
    own = model.state_dict()
    head = {f"{n}.{p}" for n, m in model.named_modules() if m is model.get_classifier() for p in ("weight", "bias")}
    sd = {k: v for k, v in sd.items() if not (k in head and k in own and own[k].shape != v.shape)}
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            raise BackboneError(f"{path}: '{k}' has shape {tuple(v.shape)} but {architecture(model)} expects "
                                f"{tuple(own[k].shape)}; use the weights of the matching architecture")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in head]
    if missing or unexpected:
        raise BackboneError(f"{path} does not fit {architecture(model)}: missing {missing[:3]}, unexpected "
                            f"{unexpected[:3]}; use the weights of the matching architecture")


def pretrained_tag(weights: str | Path | None) -> str | None:
    """The tag ``weights`` names when it names pretrained weights rather than a file: ``""`` for
    ``pretrained`` (the architecture's default), ``TAG`` for ``pretrained:TAG`` (timm's ``<model>.TAG``, or a
    small ViT's shipped ``<model>.TAG.safetensors``); None for a file, a folder or none."""
    kind, sep, tag = str(weights).partition(":")
    return tag if kind.lower() == "pretrained" and (sep or not tag) else None


def shipped_weights(name: str, tag: str) -> Path:
    """The weights file shipped for one of our small ViTs (``--weights pretrained:TAG``; plain ``pretrained``
    is the ``fractal`` tag), or one line naming the tags that ship and how to make weights."""
    path = EMBEDDED_DIR / f"{name}.{tag}.safetensors"
    if path.is_file():
        return path
    tags = sorted(p.name[len(name) + 1:-len(".safetensors")] for p in EMBEDDED_DIR.glob(f"{name}.*.safetensors"))
    shipped = f"shipped: {', '.join(f'pretrained:{t}' for t in tags)}" if tags else "none ship"
    raise BackboneError(f"{name} has no shipped weights {tag!r} ({shipped}); pre-train them (rlrr pretrain --model "
                        f"{name} --output DIR) and pass --weights DIR/{name}.fractal.safetensors, or --weights none "
                        "for a random start")


def create_backbone(name: str, weights: str | Path | None = "pretrained", num_classes: int | None = None,
                    **kwargs) -> torch.nn.Module:
    """Create a timm model (or, for ``hf:<hub id or folder>``, a transformers one) and load weights.

    ``weights``: a local file (.safetensors / .pth / .bin / Google .npz); ``"pretrained"`` for timm's
    own mechanism (Hugging Face cache or download); ``None`` / ``"none"`` for random init (tests only).
    ``num_classes`` None: the classifier of a local weights file when it has one (a merged model keeps
    its head), else the architecture's default.
    The embedded backbone's ``"pretrained"`` is the fractal checkpoint shipped with the package, and
    ``"pretrained:TAG"`` another one shipped beside it (``fractal1k``: the proxy suite's); for timm's
    models ``"pretrained:TAG"`` is timm's ``<model>.TAG`` (e.g. ``augreg_in21k``).
    """
    if name.startswith(PREFIX):
        return create_hf(name[len(PREFIX):], weights, num_classes, **kwargs)
    if not timm.is_model(name):  # before the pretrained path, which would blame the network
        import difflib
        close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
        raise BackboneError(f"unknown model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else "") +
                            " (timm.list_models('*part*') lists timm's names; hf:<hub id> for transformers)")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    tag = pretrained_tag(weights)
    if name in SMALL_VITS and tag is not None:  # ours: no hub weights to fall back on
        weights, tag = shipped_weights(name, tag or "fractal"), None
    try:
        if tag is None:
            local = weights is not None and str(weights).lower() != "none"
            weights = weights_file(weights) if local else weights
            sd = read_state_dict(weights) if local and Path(weights).suffix != ".npz" and Path(weights).is_file() else None
            own_head = checkpoint_num_classes(name, sd) if num_classes is None and sd is not None else None
            if own_head:
                kwargs["num_classes"] = own_head  # a merged model keeps its own head
            model = timm.create_model(name, pretrained=False, **kwargs)
            if sd is not None and "global_pool" not in kwargs and pooled_by_average(model, sd):
                model = timm.create_model(name, pretrained=False, global_pool="avg", **kwargs)
            if local:
                load_weights(model, weights, sd)
        else:
            model = _create_pretrained(f"{name}.{tag}" if tag else name, **kwargs)
    except BackboneError:
        raise
    except Exception as e:  # noqa: BLE001 - unknown names, impossible sizes: one line either way
        opts = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        raise BackboneError(f"cannot create {name!r}{f' with {opts}' if opts else ''}: {e}".splitlines()[0]) from None
    if "img_size" in kwargs:  # the data transforms follow the model actually built, not its pretrained size
        c, *_ = model.pretrained_cfg.get("input_size", (3,))
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (c, *_pair(kwargs["img_size"]))}
    return model


def check_input_size(model: torch.nn.Module) -> None:
    """One forward of a blank image at the size the data will have: an impossible ``--img-size`` is a
    one-line error naming the constraint, not a traceback from deep inside the first training step."""
    size = model.pretrained_cfg["input_size"]
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    was = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *size, dtype=next(model.parameters()).dtype))
    except Exception as e:  # noqa: BLE001 - whatever the architecture checks, the fix is the same
        need = f"; with patch size {tuple(patch)} use a multiple of it" if patch else ""
        raise BackboneError(f"input size {tuple(size[1:])} does not fit {architecture(model)} "
                            f"({str(e).splitlines()[0][:160]}){need}; pass another --img-size") from None
    finally:
        model.train(was)


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _create_pretrained(name: str, **kwargs) -> torch.nn.Module:
    """timm's pretrained path with short network timeouts, so an offline machine fails in seconds."""
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    if "." in name and name not in timm.list_pretrained(name):
        arch = name.split(".")[0]
        tags = ", ".join(f"pretrained:{t.split('.', 1)[1]}" for t in timm.list_pretrained(f"{arch}.*"))
        raise BackboneError(f"timm has no pretrained weights {name.split('.', 1)[1]!r} for {arch}"
                            f" ({f'it has {tags}' if tags else 'it has none'}); pass --weights pretrained or a file")
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - network, cache and hub errors all need the same advice
        cfg = timm.models.get_pretrained_cfg(name) or {}
        hub = getattr(cfg, "hf_hub_id", None) or "timm/" + name
        raise BackboneError(
            f"no pretrained weights for {name} ({type(e).__name__}: offline?); download "
            f"https://huggingface.co/{hub}/resolve/main/model.safetensors and pass weights=PATH "
            f"(CLI: --weights PATH), or fill the Hugging Face cache ($HF_HOME) on a machine with network") from None
