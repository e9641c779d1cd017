"""HF peft's tuners as rivals: method ``peft:<tuner>`` (``peft:lora``, ``peft:vera``, ``peft:boft``, ...).

The tuner's config fields come as options (``--method-opt r=8``); its targets default to the backbone's
discovered block linears (IA3's feed-forward set to the MLP output layers; LN tuning targets the norms).
peft wraps the model in a ``PeftModel`` (the trainer calls it like the backbone); parameters count
through the same summary (peft layers name their adapter tensors in ``adapter_layer_names``), adapters
save and load through the project's adapter files, and ``merge`` is peft's own ``merge_and_unload``
back to the plain model.
RLRR itself is not a peft tuner: peft's ``register_peft_method`` only accepts names already in its
closed ``PeftType`` enum, and we do not patch it (the way into peft is upstream).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from ..backbones.discover import classifier_modules, discover, is_norm, role
from ..config import check_fields
from .base import Composed, Method, MergeError, register

PREFIX = "peft:"
ALIASES = {"dora": ("lora", {"use_dora": True})}  # tuners that are options of another
NORM_TUNERS = {"ln_tuning"}  # tuners that adapt the norms, not the linears

# Tuners verified on timm and HF vision models (tests/test_zoo.py: apply, one step, adapter round trip,
# merge where peft merges); benchmarks/peft_tuners.py prints their ViT-B/16 counts for the README.
# Left out, and why, in the README: prompt/prefix tuners and X-LoRA, Poly, AdaLoRA, Shadow, tokens.
VERIFIED = ("lora", "dora", "vera", "boft", "oft", "hra", "fourierft", "loha", "lokr", "ia3", "glora", "adamss",
            "beft", "c3a", "deft", "delora", "frod", "gralora", "hira", "lily", "ln_tuning", "miss", "osf",
            "peanut", "psoft", "pvera", "randlora", "road", "shira", "supertuning", "tinylora", "unilora",
            "vblora", "waveft")


@dataclass
class PeftMethodConfig:
    """tuner: a peft tuner name (its PeftType, any case); options: that tuner's config fields."""
    tuner: str = "lora"
    options: dict = field(default_factory=dict)
    train_head: bool = True

    @property
    def method(self) -> str:
        return PREFIX + self.tuner


def _peft():
    from ..extras import need
    return need("peft", "peft: methods", "peft")


def peft_config(model: nn.Module, cfg: PeftMethodConfig):
    """The tuner's own config object, targets defaulting to the discovered block linears."""
    peft = _peft()
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    name, preset = ALIASES.get(cfg.tuner.lower(), (cfg.tuner, {}))
    try:
        cls = PEFT_TYPE_TO_CONFIG_MAPPING[peft.PeftType[name.upper()]]
    except KeyError:
        raise ValueError(f"peft has no tuner {cfg.tuner!r}; choose one of "
                         f"{', '.join(t.value.lower() for t in peft.PeftType)}") from None
    opts = {**preset, **cfg.options}
    found = discover(model)
    if name.lower() in NORM_TUNERS:
        norms = [n for n in found.norms if is_norm(model.get_submodule(n))]
        # a regex, matched whole: peft reads a name list by suffix, and the final "norm" would also
        # catch every attention's parameter-free `.norm` placeholder
        default, missing = "|".join(map(re.escape, norms)), "norm with an affine weight and bias"
    else:
        default = [n for n in found.targets if isinstance(model.get_submodule(n), nn.Linear)]
        missing = "nn.Linear"
    opts.setdefault("target_modules", default)
    if not opts["target_modules"]:
        raise ValueError(f"peft {name} found no {missing} in {type(model).__name__}'s blocks (its weight layers are "
                         "convolutions); pass target_modules=... naming layers this tuner supports")
    if "feedforward_modules" in cls.__dataclass_fields__ and "feedforward_modules" not in cfg.options:
        opts["feedforward_modules"] = [n for n in opts["target_modules"] if role(n) == "fc2"]
    opts = check_fields(cls, opts, f"peft {name} option")
    try:
        return cls(**opts)
    except (TypeError, ValueError) as e:
        raise ValueError(f"peft {name}: {str(e).splitlines()[0]}") from None


def apply_peft(model: nn.Module, cfg: PeftMethodConfig) -> nn.Module:
    peft = _peft()
    heads, config = classifier_modules(model), peft_config(model, cfg)
    try:
        wrapped = peft.get_peft_model(model, config)
    except (ValueError, TypeError, NotImplementedError) as e:
        raise ValueError(f"peft {cfg.tuner} does not fit {type(model).__name__}: {str(e).splitlines()[0]}") from None
    for head in heads if cfg.train_head else []:
        head.requires_grad_(True)
    return wrapped


def merge_peft(model: nn.Module) -> nn.Module:
    try:
        return model.merge_and_unload()
    except (NotImplementedError, ValueError, AttributeError) as e:
        raise MergeError(f"this peft tuner cannot be merged ({str(e).splitlines()[0]})") from None


def peft_method(name: str) -> Method:
    if "+pace" in name:
        raise ValueError(f"{name}: PACE wraps rlrr's own methods (rlrr, lora, ssf, adapter, hta), not peft "
                         "tuners; drop +pace")
    return Method(name, PeftMethodConfig, apply_peft, merge_peft)


def make_peft_config(name: str, values: dict) -> PeftMethodConfig:
    """From flat tuner options (CLI) or from adapter metadata (``tuner``/``options``/``train_head``)."""
    tuner = name.removeprefix(PREFIX)
    if "options" in values or "tuner" in values:
        return PeftMethodConfig(**{**values, "tuner": tuner})
    train_head = values.pop("train_head", True)
    return PeftMethodConfig(tuner=tuner, options={k: list(v) if isinstance(v, tuple) else v
                                                  for k, v in values.items()}, train_head=train_head)


register(Composed(lambda name: name.startswith(PREFIX), peft_method, make_peft_config))
