"""Hugging Face ``transformers`` image classifiers as backbones: ``create_backbone("hf:<hub id or folder>")``.

The model stays a plain ``transformers`` model (so ``merge`` hands back something ``save_pretrained``
can write, and ``transformers.Trainer`` can train it); what the rest of the library needs is attached
beside it: ``pretrained_cfg`` (timm-style input size, mean, std, interpolation, crop from the
checkpoint's image-processor config) for the data transforms.  Calling the model on a batch returns
an output object; ``logits_of`` takes the logits from it (timm models return the tensor itself).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import BackboneError

PREFIX = "hf:"
log = logging.getLogger(__name__)
RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL codes in HF processor configs


def is_hf(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.")


def logits_of(out: Any) -> torch.Tensor:
    """Logits from a model call: the tensor itself (timm) or the ``.logits`` of an HF output."""
    return out if isinstance(out, torch.Tensor) else out.logits


class LogitsOnly(nn.Module):
    """``model`` with a tensor out, whatever it returns (for ONNX export of HF models)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(x))


def _transformers():
    from ..extras import need
    return need("hf", "hf: models", "transformers")


def data_cfg(source: str, config) -> dict:
    """timm-style data config from the checkpoint's image processor (fallback: config.image_size, 0.5/0.5)."""
    t = _transformers()
    try:
        proc = t.AutoImageProcessor.from_pretrained(source)
    except Exception:  # noqa: BLE001 - no processor saved (e.g. a random test model): use the model config
        proc = None
        log.warning("hf:%s has no image processor (preprocessor_config.json): images are normalised with mean and "
                    "std 0.5 at the config's image_size; save the processor beside the model if it was trained "
                    "otherwise", source)
    channels, side_h, side_w = config_input_size(config)
    size = getattr(proc, "crop_size", None) or getattr(proc, "size", None) or {}
    h = size.get("height") or size.get("shortest_edge") or side_h
    w = size.get("width") or size.get("shortest_edge") or side_w
    resize = (getattr(proc, "size", None) or {}).get("shortest_edge")
    crop_pct = getattr(proc, "crop_pct", None) or (min(h, w) / resize if resize and getattr(proc, "do_center_crop", False)
                                                  else 1.0)
    return {"input_size": (channels, h, w),
            "mean": tuple(getattr(proc, "image_mean", None) or (0.5, 0.5, 0.5)),
            "std": tuple(getattr(proc, "image_std", None) or (0.5, 0.5, 0.5)),
            "interpolation": RESAMPLE.get(int(getattr(proc, "resample", 3) or 3), "bicubic"),
            "crop_pct": crop_pct, "architecture": PREFIX + source}


def config_input_size(config) -> tuple[int, int, int]:
    """(channels, height, width) an HF config was built for; ``image_size`` is an int or an (h, w) list
    (Hiera, PVTv2), 224 when absent; a CLIP-style model's is in its ``vision_config``."""
    vision = getattr(config, "vision_config", None) or config
    side = getattr(vision, "image_size", None) or 224
    h, w = (int(side[0]), int(side[-1])) if isinstance(side, (tuple, list)) else (int(side), int(side))
    return getattr(vision, "num_channels", None) or 3, h, w


def create_hf(source: str, weights: str | Path | None, num_classes: int | None, **kwargs) -> nn.Module:
    """An ``AutoModelForImageClassification`` from a local folder or the HF cache.

    ``weights``: "pretrained" (the folder's / cache's weights), None / "none" (random, from the config).
    A classifier of another size is re-initialised: that is the fine-tuning case.
    """
    t = _transformers()
    if weights is not None and str(weights).lower() not in ("none", "pretrained"):
        raise BackboneError(f"hf: models load their own weights from the folder or hub id; drop --weights {weights}")
    if kwargs.pop("img_size", None):
        raise BackboneError("--img-size is not supported for hf: models; they run at their config's image_size")
    drop_path = kwargs.pop("drop_path_rate", None)
    if kwargs:
        raise BackboneError(f"hf: models take no option(s) {sorted(kwargs)}")
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    folder = Path(source) if Path(source).is_dir() else None
    if folder is not None:
        refuse_remote_code(folder)
    labels = {"num_labels": num_classes} if num_classes else {}
    never = {"trust_remote_code": False}  # a checkpoint's own code is never run, nor offered at a prompt
    try:
        config = _local_first(t.AutoConfig.from_pretrained, source, **labels, **never)
    except Exception as e:  # noqa: BLE001 - missing, offline, malformed: said with the fix for each
        raise BackboneError(_load_error(source, folder, "config.json", e)) from None
    if type(config) not in t.AutoModelForImageClassification._model_mapping:
        raise BackboneError(f"hf:{source} is a {type(config).__name__.removesuffix('Config')} model, which "
                            "transformers has no image classifier for; pass a vision model (ViT, DINOv2, Swin, ...)")
    if drop_path and hasattr(config, "drop_path_rate"):
        config.drop_path_rate = drop_path
    try:
        if weights is None or str(weights).lower() == "none":
            model = t.AutoModelForImageClassification.from_config(config, **never)
        else:
            model = _local_first(t.AutoModelForImageClassification.from_pretrained, source, config=config,
                                 ignore_mismatched_sizes=True, **never)
    except Exception as e:  # noqa: BLE001 - as above, for the weights file
        raise BackboneError(_load_error(source, folder, "weights", e)) from None
    model.pretrained_cfg = data_cfg(source, config)
    return model


def refuse_remote_code(folder: Path) -> None:
    """A folder whose config asks for its own Python code (``auto_map``) is refused: rlrr loads only the
    model classes transformers ships, so a downloaded checkpoint can never run code here."""
    import json
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return  # no or unreadable config: the loader below says so
    if isinstance(config, dict) and config.get("auto_map"):
            raise BackboneError(f"hf:{folder} needs its own code (auto_map in config.json), which rlrr never runs; "
                             "use a checkpoint of a model class that transformers ships")


def _load_error(source: str, folder: Path | None, what: str, e: Exception) -> str:
    """The one line for a checkpoint that does not load: what is wrong with a local folder's file, or how
    to get a hub id onto this machine."""
    first = (str(e).splitlines() or [""])[0][:160]
    if folder is None:
        return (f"cannot load hf:{source} ({type(e).__name__}: {first}); on a machine with network run "
                f"`hf download {source} --local-dir DIR` and pass --model hf:DIR, or fill the Hugging Face cache "
                "($HF_HOME)")
    if "pickle" in type(e).__name__.lower() or "weights_only" in str(e):
        return (f"hf:{folder}: pytorch_model.bin holds pickled code, which rlrr never runs; convert the weights to "
                "model.safetensors")
    bad = next((p for p in sorted(folder.glob("*.safetensors")) if not _readable(p)), None) if what == "weights" else None
    if bad is not None:
        return (f"hf:{folder}: {bad} is damaged or cut short (its tensors do not read); download it again "
                f"(`hf download <hub id> --local-dir {folder}`)")
    return f"hf:{folder}: its {what} file(s) do not load ({type(e).__name__}: {first}); fix or re-download the folder"


def _readable(path: Path) -> bool:
    """Whether every tensor of a safetensors file reads (a file cut short fails at its header or its data)."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)
        return True
    except Exception:  # noqa: BLE001 - any failure to read is "not readable"
        return False


def _local_first(load, source: str, **kwargs):
    """A folder or cached copy without touching the network; the Hub only when neither exists."""
    try:
        return load(source, local_files_only=True, **kwargs)
    except OSError:
        if Path(source).exists():
            raise
        return load(source, **kwargs)


def reset_hf_classifier(model: nn.Module, num_classes: int) -> None:
    """A fresh classifier for ``num_classes`` labels (every head the model has), config updated to match."""
    for name in ("classifier", "cls_classifier", "distillation_classifier"):
        old = getattr(model, name, None)
        if isinstance(old, nn.Linear):
            setattr(model, name, nn.Linear(old.in_features, num_classes, device=old.weight.device,
                                           dtype=old.weight.dtype))
    model.config.num_labels = num_classes
