"""Tiny real timm models (random init, built from timm's own configs) shared by the tests."""
import pytest
import timm
import torch

from rlrr.backbones.hf import logits_of

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


def one_step(model: torch.nn.Module, x: torch.Tensor) -> None:
    """One Adam step on cross-entropy: every trainable tensor moves by about lr."""
    import rlrr
    opt = torch.optim.Adam([p for _, p in rlrr.trainable_parameters(model)], lr=1e-2)
    model.train()
    torch.nn.functional.cross_entropy(logits_of(model(x)), torch.arange(len(x)) % 2).backward()
    opt.step()
    model.eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def round_trip(make, x: torch.Tensor, tmp_path) -> None:
    """RLRR on ``make()`` (a fresh, seeded model each call): identity init starts at the pretrained
    function, one step changes it, the adapter reloads onto a fresh model exactly, and the merge is the
    untouched architecture (same keys and module types) computing the same function."""
    import rlrr
    torch.manual_seed(0)
    model = make().eval()
    types = {n: type(m) for n, m in model.named_modules()}
    keys = list(model.state_dict())
    with torch.no_grad():
        base = logits_of(model(x))
    model = rlrr.apply(model, rlrr.RLRRConfig(init="identity"))
    s = rlrr.summary(model)
    assert s["method_params"] > 0 and s["trainable_params"] == s["method_params"] + s["head_params"]
    with torch.no_grad():
        assert torch.allclose(logits_of(model(x)), base, atol=1e-5)  # identity init: the pretrained function
    one_step(model, x)
    with torch.no_grad():
        ref = logits_of(model(x))
    assert rel(ref, base) > 1e-4  # the step changed the function
    path = rlrr.save_adapter(model, tmp_path / "a.safetensors")
    torch.manual_seed(0)
    fresh = make().eval()
    with torch.no_grad():
        assert torch.allclose(logits_of(rlrr.load_adapter(fresh, path).eval()(x)), ref, atol=1e-6)
        merged = rlrr.merge(model)
        assert rel(logits_of(merged(x)), ref) <= 1e-5
    assert list(merged.state_dict()) == keys
    assert {n: type(m) for n, m in merged.named_modules()} == types


def applied(model: torch.nn.Module, method: str, fits: bool) -> torch.nn.Module | None:
    """``model`` with ``method`` applied when it fits; else None, once the refusal is checked to be one line."""
    import rlrr
    if fits:
        return rlrr.apply(model, rlrr.make_config(method))
    with pytest.raises(ValueError) as e:
        rlrr.apply(model, rlrr.make_config(method))
    assert "\n" not in str(e.value)
    return None
