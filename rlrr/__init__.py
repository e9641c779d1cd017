"""rlrr: Residual-based Low-Rank Rescaling (Dong et al., CVPR 2024) for pretrained vision backbones.

    model = rlrr.create_backbone("vit_base_patch16_224", weights="ViT-B_16.npz", num_classes=100)
    model = rlrr.apply(model, rlrr.RLRRConfig())
    ... train ...
    rlrr.save_adapter(model, "adapter.safetensors")
    plain = rlrr.merge(model)  # the untouched timm architecture, zero inference overhead
    model = rlrr.load_model("vit_base_patch16_224", "ViT-B_16.npz", adapter="adapter.safetensors")  # inference
"""
from .version import __version__ as __version__

from .adapter import Adapter, AdapterMismatchError, load_adapter, load_model, read_adapter, save_adapter
from .backbones import BackboneError, create_backbone
from .serving.bank import AdapterBank
from .methods.base import MergeError, apply, format_summary, get_method, make_config, merge, summary, trainable_parameters
from .methods.rlrr import RLRRConfig, RescaledConv2d, RescaledLinear
from .methods.ssf import SSFConfig

__all__ = ["Adapter", "AdapterBank", "AdapterMismatchError", "BackboneError", "MergeError", "RLRRConfig",
           "RescaledConv2d", "RescaledLinear", "SSFConfig", "apply", "create_backbone", "format_summary", "get_method",
           "load_adapter", "load_model", "make_config", "merge", "read_adapter", "save_adapter", "summary",
           "trainable_parameters"]
