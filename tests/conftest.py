"""Tiny real timm models (random init, built from timm's own configs) shared by the tests."""
import pytest
import timm
import torch

torch.set_num_threads(2)

TINY = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3), 32),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=56, embed_dim=24, depths=(1, 1), num_heads=(1, 2)), 56),
    "convnext": ("convnext_atto", dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)), 32),
    "resnet": ("resnet18", dict(layers=(1, 1, 1, 1)), 32),
}


def tiny(family: str, num_classes: int = 5, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, str, dict]:
    """(model in eval mode, an input batch, timm name, kwargs) for a small member of ``family``."""
    name, kwargs, size = TINY[family]
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs).eval()
    return model, torch.randn(2, 3, size, size), name, {**kwargs, "num_classes": num_classes}


@pytest.fixture
def tiny_model():
    return tiny


def applied(model: torch.nn.Module, method: str, fits: bool) -> torch.nn.Module | None:
    """``model`` with ``method`` applied when it fits; else None, once the refusal is checked to be one line."""
    import rlrr
    if fits:
        return rlrr.apply(model, rlrr.make_config(method))
    with pytest.raises(ValueError) as e:
        rlrr.apply(model, rlrr.make_config(method))
    assert "\n" not in str(e.value)
    return None
