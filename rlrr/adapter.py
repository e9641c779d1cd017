"""Adapter files: the trainable tensors of a model (method parameters + head) in safetensors.

The metadata says which method, with which config, on which backbone, so ``load_adapter`` can
rebuild the method on a fresh backbone and refuse, in one line, a file that does not fit it.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from .backbones import architecture, fingerprint
from .files import atomic_write
from .methods.base import apply, make_config, trainable_parameters

FORMAT = "rlrr-adapter/1"


class AdapterMismatchError(ValueError):
    """An adapter file does not fit the model it is loaded onto."""


def batchnorm_stats(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Running statistics of BatchNorms: training in train mode moves them even when the norm is
    frozen, so an adapter without them would not reproduce a ResNet/EfficientNet it was trained on."""
    return {f"{n}.{b}" if n else b: t for n, m in model.named_modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            for b, t in m.named_buffers(recurse=False) if t is not None}


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What an adapter file holds: the trainable tensors and the BatchNorm running statistics."""
    state = {n: p.detach() for n, p in trainable_parameters(model)} | batchnorm_stats(model)
    return {n: t.cpu().contiguous() for n, t in state.items()}


def adapter_metadata(model: torch.nn.Module) -> dict[str, str]:
    from .version import __version__
    cfg = getattr(model, "rlrr_config", None)
    return {"format": FORMAT, "method": getattr(model, "rlrr_method", None) or "none",
            "config": json.dumps(dataclasses.asdict(cfg) if cfg is not None else {}),
            "backbone": architecture(model), "library_version": __version__,
            "backbone_fingerprint": getattr(model, "backbone_fingerprint", None) or fingerprint(model),
            "input_size": json.dumps(list((getattr(model, "pretrained_cfg", None) or {}).get("input_size") or []) or None),
            "shapes": json.dumps({n: list(p.shape) for n, p in trainable_parameters(model)})}


def save_adapter(model: torch.nn.Module, path: str | Path, extra: dict[str, str] | None = None) -> Path:
    """Write the trainable tensors and metadata; atomic (temp file + rename) so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = save(adapter_state(model), metadata={**adapter_metadata(model), **(extra or {})})
    return atomic_write(path, lambda f: f.write(data))


def read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise AdapterMismatchError(f"{path} is not a readable safetensors adapter ({e})") from None
    if meta.get("format") != FORMAT:
        raise AdapterMismatchError(f"{path} is not an rlrr adapter (format {meta.get('format')!r}); "
                                   "save adapters with rlrr.save_adapter")
    for key in ("method", "config", "backbone"):
        if key not in meta:
            raise AdapterMismatchError(f"{path}: its metadata has no '{key}' (edited or written by hand?); "
                                       "save adapters with rlrr.save_adapter")
    for key in ("config", "input_size", "class_names"):
        try:
            json.loads(meta.get(key, "null"))
        except json.JSONDecodeError:
            raise AdapterMismatchError(f"{path}: metadata '{key}' is not JSON ({meta[key][:60]!r}); the file was "
                                       "edited or not written by rlrr.save_adapter") from None
    bad = next((k for k, t in tensors.items() if t.is_floating_point() and not t.isfinite().all()), None)
    if bad is not None:
        raise AdapterMismatchError(f"{path}: tensor '{bad}' holds NaN or Inf values; the run that wrote it "
                                   "diverged: retrain (lower --lr) rather than use it")
    return tensors, meta


@dataclasses.dataclass(frozen=True)
class Adapter:
    """An adapter file read once (and checked, by ``read_adapter``): its tensors and what its metadata says,
    passed to everything that needs either instead of reading the file again."""
    path: Path
    tensors: dict[str, torch.Tensor]
    meta: dict[str, str]

    @classmethod
    def read(cls, path: str | Path) -> "Adapter":
        return cls(Path(path), *read_adapter(path))

    @property
    def input_size(self) -> list[int] | None:
        """(channels, height, width) the adapter was trained at, when it recorded it."""
        return json.loads(self.meta.get("input_size", "null"))

    def class_names(self, num_classes: int) -> list[str]:
        return class_names(self.meta, num_classes)


def load_model(name: str, weights: str | Path | None = "pretrained", adapter: str | Path | Adapter | None = None,
               img_size: int | None = None, check_fingerprint: bool = True) -> torch.nn.Module:
    """The one way a model for inference is made: a backbone (``weights``: as ``create_backbone``) built once,
    with the class count and input size decided first — the adapter's head and the size it was trained at
    (unless ``img_size`` is given), or for a merged checkpoint its own classifier — then the adapter
    (a path or an ``Adapter`` already read) applied.  Used by the CLI, the analysis and the bank."""
    from .backbones import checkpoint_num_classes, create_backbone
    if adapter is not None and not isinstance(adapter, Adapter):
        adapter = Adapter.read(adapter)
    kw = {"img_size": img_size} if img_size else {}
    if adapter is not None:
        kw["num_classes"] = checkpoint_num_classes(name, adapter.tensors)
        trained_at = adapter.input_size
        if trained_at and not img_size and not name.startswith("hf:") and timm_input_size(name) != trained_at:
            kw["img_size"] = tuple(trained_at[1:])
    model = create_backbone(name, weights=weights, **kw)
    if adapter is not None:
        model = load_adapter(model, adapter, check_fingerprint=check_fingerprint)
    return model.eval()


def timm_input_size(name: str) -> list[int] | None:
    """The input size timm builds ``name`` at by default, read from its config (nothing is built)."""
    import timm
    cfg = timm.models.get_pretrained_cfg(name)
    return list(cfg.input_size) if cfg is not None and getattr(cfg, "input_size", None) else None


def class_names(meta: dict[str, str], num_classes: int) -> list[str]:
    """The class names an adapter's metadata recorded (by class id), or the ids as text where it recorded
    none (or names that do not fit its head)."""
    names = json.loads(meta.get("class_names", "[]"))
    return names if len(names) == num_classes else [str(i) for i in range(num_classes)]


def load_adapter(model: torch.nn.Module, path: str | Path | Adapter, check_fingerprint: bool = True) -> torch.nn.Module:
    """Load an adapter (a file, or an ``Adapter`` already read); applies its method first if the model is a
    plain backbone. Returns the model.

    ``check_fingerprint``: refuse backbone weights other than those the adapter was trained on.
    """
    adapter = path if isinstance(path, Adapter) else Adapter.read(path)
    path, tensors, meta, trained_at = adapter.path, adapter.tensors, adapter.meta, adapter.input_size
    runs_at = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    if trained_at and runs_at and list(runs_at) != trained_at and meta["backbone"] != architecture(model):
        raise AdapterMismatchError(f"{path} was trained on {meta['backbone']} but this model is {architecture(model)}; "
                                   f"load it onto {meta['backbone']}")  # the architecture first: a size fix would not help
    if trained_at and runs_at and list(runs_at) != trained_at:
        raise AdapterMismatchError(f"{path} was trained at input size {trained_at[1]}×{trained_at[2]} but this model "
                                   f"runs at {runs_at[1]}×{runs_at[2]}; create it with img_size=({trained_at[1]}, "
                                   f"{trained_at[2]}) (CLI: --img-size {trained_at[1]})")
    saved = meta.get("backbone_fingerprint")
    if check_fingerprint and saved:  # of the plain model, before the method changes its modules
        model.backbone_fingerprint = getattr(model, "backbone_fingerprint", None) or fingerprint(model)
    if getattr(model, "rlrr_method", None) is None and meta["method"] != "none":
        model = apply(model, make_config(meta["method"], **json.loads(meta["config"])))
    elif getattr(model, "rlrr_method", None) not in (None, meta["method"]):
        raise AdapterMismatchError(f"{path} holds a {meta['method']} adapter but the model has "
                                   f"{model.rlrr_method} applied; load it onto a plain backbone")
    own = dict(model.named_parameters()) | batchnorm_stats(model)
    hint = f" (the adapter was trained on {meta['backbone']}; load it onto that backbone)" \
        if meta["backbone"] != architecture(model) else ""
    for name, p in own.items():  # model order, so the first mismatch named is the first layer
        t = tensors.get(name)
        if t is not None and p.shape != t.shape:
            extra = " (different num_classes? create the backbone with the adapter's class count)" \
                if not hint and name.split(".")[0] in ("head", "fc", "classifier") else hint
            raise AdapterMismatchError(f"{path} does not fit: '{name}' is {tuple(p.shape)} in the model "
                                       f"but {tuple(t.shape)} in the file{extra}")
    unknown = [n for n in tensors if n not in own]
    if unknown:
        raise AdapterMismatchError(f"{path} does not fit: the model has no layer '{unknown[0]}'{hint}")
    missing = [n for n, _ in trainable_parameters(model) if n not in tensors]
    if missing:
        raise AdapterMismatchError(f"{path} does not fit: it lacks '{missing[0]}' that this model trains{hint}")
    if check_fingerprint and saved and saved != model.backbone_fingerprint:
        raise AdapterMismatchError(
            f"{path} was trained on backbone weights {saved} but this model's are {model.backbone_fingerprint}; "
            "load the weights it was trained on, or pass --ignore-fingerprint (API: check_fingerprint=False) "
            "to use it anyway")
    with torch.no_grad():
        for name, t in tensors.items():
            own[name].copy_(t)
    return model
