"""Habits practitioners bring. --grad-checkpointing: the same gradients as without it (timm ViT and Swin
through timm's switch, an HF model through transformers', any other block structure through
torch.utils.checkpoint), for RLRR, LoRA, SSF and RLRR+PACE (whose noise must be drawn the same in the
recomputation), and fewer saved activations; --compile; a model card the Hub's own reader takes."""
import copy

import pytest
import torch
from conftest import tiny
from torch import nn

import rlrr
from rlrr.backbones.hf import logits_of
from rlrr.engine.checkpointing import enable_grad_checkpointing
from rlrr.engine.memory import saved_activation_bytes


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm1, self.fc1, self.fc2, self.norm2 = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d), \
            nn.LayerNorm(d)

    def forward(self, x):
        return self.norm2(x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm1(x)))))


class Plain(nn.Module):
    """A model no library made: a patch embedding, four blocks, a head."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.pretrained_cfg = {"input_size": (3, 16, 16)}  # what discovery's one example forward runs at
        self.embed, self.blocks, self.head = nn.Linear(48, d), nn.Sequential(*[Block(d) for _ in range(4)]), \
            nn.Linear(d, 3)

    def forward(self, x):
        x = x.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)
        return self.head(self.blocks(self.embed(x)).mean(1))


def hf_vit():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=8, num_labels=3)
    model = transformers.ViTForImageClassification(config)
    model.pretrained_cfg = {"input_size": (3, 32, 32)}
    return model, torch.randn(2, 3, 32, 32)


FAMILIES = {"vit": lambda: tiny("vit")[:2], "swin": lambda: tiny("swin")[:2], "hf": hf_vit,
            "plain": lambda: (torch.manual_seed(0), Plain())[1:] + (torch.randn(2, 3, 16, 16),)}
HOW = {"vit": "timm", "swin": "timm", "hf": "transformers", "plain": "blocks"}


def grads(model, x, seed: int = 0) -> dict[str, torch.Tensor]:
    model.train()
    torch.manual_seed(seed)  # PACE's noise
    logits_of(model(x)).square().mean().backward()
    return {n: p.grad.clone() for n, p in rlrr.trainable_parameters(model)}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", ["rlrr", "lora", "ssf", "rlrr+pace"])
def test_checkpointing_keeps_the_gradients(family, method):
    if family == "plain" and method == "lora":
        pytest.skip("LoRA's q/v roles: transformers only")
    base, x = FAMILIES[family]()
    model = rlrr.apply(base, rlrr.make_config(method, **({"sigma": 0.5} if "pace" in method else {})))
    plain, ckpt = copy.deepcopy(model), copy.deepcopy(model)
    assert enable_grad_checkpointing(ckpt) == HOW[family]
    want, got = grads(plain, x), grads(ckpt, x)
    assert want.keys() == got.keys() and want
    for n in want:
        assert torch.allclose(got[n], want[n], atol=1e-6, rtol=1e-4), (family, method, n)
    assert set(dict(ckpt.named_parameters())) == set(dict(plain.named_parameters()))  # no name changed


@pytest.mark.parametrize("family", ["vit", "plain"])
def test_checkpointing_saves_fewer_activations(family):
    base, x = FAMILIES[family]()
    model = rlrr.apply(base, rlrr.RLRRConfig()).train()
    params = [p for p in model.parameters()]
    without = saved_activation_bytes(lambda: logits_of(model(x)), params + [x])
    enable_grad_checkpointing(model)
    with_ = saved_activation_bytes(lambda: logits_of(model(x)), params + [x])
    assert with_ < without / 2, (with_, without)


def test_a_checkpointed_plain_model_copies_and_evaluates_as_itself():
    base, x = FAMILIES["plain"]()
    model = rlrr.apply(base, rlrr.RLRRConfig())
    enable_grad_checkpointing(model)
    twin = copy.deepcopy(model)
    assert twin.blocks[0].forward.args[0] is twin.blocks[0]  # the copy checkpoints its own block
    with torch.no_grad():
        assert torch.equal(twin.eval()(x), model.eval()(x))
    assert grads(twin, x).keys() == grads(model, x).keys()


def test_train_with_checkpointing_and_compile_ends_where_plain_training_does(tmp_path, capsys):
    from fixtures import make_vtab
    from rlrr.adapter import read_adapter
    from rlrr.cli import main
    task = make_vtab(tmp_path / "data")
    args = ["train", "--model", "vit_pico_patch4_32", "--weights", "none", "--no-progress", "--batch-size", "8",
            "--warmup-epochs", "0", "--lr", "3e-3", "--epochs", "1", "--data", f"vtab1k:{task}"]
    assert main([*args, "--output", str(tmp_path / "plain")]) == 0
    assert main([*args, "--output", str(tmp_path / "ckpt"), "--grad-checkpointing", "--compile", "aot_eager"]) == 0
    plain, ckpt = (read_adapter(tmp_path / run / "adapter.safetensors")[0] for run in ("plain", "ckpt"))
    assert plain.keys() == ckpt.keys()
    for k in plain:
        assert torch.allclose(plain[k], ckpt[k], atol=1e-4), k
    capsys.readouterr()
    assert main([*args, "--output", str(tmp_path / "bad"), "--compile", "no_such_backend"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --compile no_such_backend: not a torch.compile backend here") and "\n" not in err


def test_a_trained_run_has_a_model_card_the_hub_reads(tmp_path):
    from fixtures import make_vtab
    from huggingface_hub import ModelCard
    from rlrr.cli import main
    task = make_vtab(tmp_path / "data")
    out = tmp_path / "run"
    assert main(["train", "--model", "vit_pico_patch4_32", "--weights", "none", "--no-progress", "--batch-size", "8",
                 "--warmup-epochs", "0", "--epochs", "1", "--data", f"vtab1k:{task}", "--output", str(out)]) == 0
    summary = __import__("json").loads((out / "summary.json").read_text())
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "rlrr" and card.data.base_model == "timm/vit_pico_patch4_32"
    assert "rlrr" in card.data.tags and card.data.pipeline_tag == "image-classification"
    result = card.data.eval_results[0]
    assert result.metric_type == "accuracy" and result.metric_value == round(summary["test_acc"], 2)
    extra = card.data.to_dict()["rlrr"]
    assert extra["method"] == "rlrr" and extra["trainable_params"] == summary["trainable_params"]
    assert extra["backbone_fingerprint"] == summary["settings"]["backbone_fingerprint"]
    assert "rlrr.load_adapter(model, \"adapter.safetensors\")" in card.text
