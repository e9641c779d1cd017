"""Proof of reach on Hugging Face transformers: tiny random checkpoints saved to a folder and loaded
back through ``create_backbone("hf:<folder>")`` (the real ``from_pretrained`` path; no downloads)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")  # the [hf] extra; .[test] installs it

import rlrr  # noqa: E402
from conftest import applied, round_trip  # noqa: E402
from rlrr.backbones.discover import discover  # noqa: E402

T = transformers
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
             patch_size=8)
MODELS = {
    "vit": lambda: T.ViTForImageClassification(T.ViTConfig(**SMALL, num_labels=3)),
    "deit": lambda: T.DeiTForImageClassification(T.DeiTConfig(**SMALL, num_labels=3)),
    "dinov2": lambda: T.Dinov2ForImageClassification(T.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=32, patch_size=8,
        num_labels=3)),
    "swin": lambda: T.SwinForImageClassification(T.SwinConfig(
        embed_dim=16, depths=[1, 1], num_heads=[1, 2], image_size=32, patch_size=4, window_size=4, num_labels=3)),
    "convnext": lambda: T.ConvNextForImageClassification(T.ConvNextConfig(
        hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32, num_labels=3)),
    "clip": lambda: T.CLIPForImageClassification(T.CLIPConfig(
        vision_config=dict(SMALL), text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=64), num_labels=3)),
}
# methods beyond rlrr/ssf/bitfit/lora that apply (convnets have no q/v and no token MLP)
EXTRA = {"vit": {"adapter"}, "deit": {"adapter"}, "dinov2": {"adapter"}, "swin": {"adapter"}, "clip": {"adapter"},
         "convnext": set()}


def checkpoint(kind: str, folder) -> str:
    """Save a tiny random model plus an image-processor config the way a Hub checkpoint folder looks."""
    torch.manual_seed(0)
    MODELS[kind]().save_pretrained(folder)
    T.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6],
                        image_std=[0.2, 0.25, 0.3]).save_pretrained(folder)
    return f"hf:{folder}"


def batch() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def step(model, x) -> None:
    opt = torch.optim.Adam([p for _, p in rlrr.trainable_parameters(model)], lr=1e-2)
    model.train()
    torch.nn.functional.cross_entropy(model(x).logits, torch.tensor([0, 2])).backward()
    opt.step()
    model.eval()


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind", list(MODELS))
def test_rlrr_on_hf_trains_merges_to_plain_transformers_and_reloads(kind, tmp_path):
    name = checkpoint(kind, tmp_path / "ckpt")
    model = rlrr.create_backbone(name).eval()
    assert model.pretrained_cfg["input_size"] == (3, 32, 32) and model.pretrained_cfg["mean"] == (0.4, 0.5, 0.6)
    x = batch()
    cls, keys = type(model), list(model.state_dict())
    types = {n: type(m) for n, m in model.named_modules()}
    model = rlrr.apply(model, rlrr.RLRRConfig())
    step(model, x)
    with torch.no_grad():
        ref = model(x).logits
    path = rlrr.save_adapter(model, tmp_path / "a.safetensors")
    again = rlrr.load_adapter(rlrr.create_backbone(name), path).eval()
    with torch.no_grad():
        assert torch.allclose(again(x).logits, ref, atol=1e-6)
        merged = rlrr.merge(model)
        assert type(merged) is cls and rel(merged(x).logits, ref) <= 1e-5
    assert list(merged.state_dict()) == keys and {n: type(m) for n, m in merged.named_modules()} == types
    merged.save_pretrained(tmp_path / "merged")
    reloaded = T.AutoModelForImageClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert rel(reloaded(x).logits, ref) <= 1e-5


@pytest.mark.parametrize("kind", list(MODELS))
def test_every_harness_method_on_hf(kind, tmp_path):
    name = checkpoint(kind, tmp_path / "ckpt")
    x = batch()
    for method in ("ssf", "bitfit", "lora", "adapter", "vpt"):
        fits = method != "vpt" and method in EXTRA[kind] | {"ssf", "bitfit", "lora"} and \
            not (method == "lora" and kind == "convnext")
        model = applied(rlrr.create_backbone(name).eval(), method, fits)
        if model is None:
            continue
        step(model, x)
        if method != "adapter":
            with torch.no_grad():
                ref = model(x).logits
                assert rel(rlrr.merge(model)(x).logits, ref) <= 1e-5


@pytest.mark.parametrize("kind", list(MODELS))
def test_methods_after_rlrr_on_hf(kind, tmp_path):
    """HTA, APLA, PACE and peft's tuners (linears and norms) train and merge back into the plain
    transformers class, or refuse in one line where a model has no attention maps."""
    pytest.importorskip("peft")
    name = checkpoint(kind, tmp_path / "ckpt")
    x = batch()
    for method in ("hta", "apla", "rlrr+pace", "peft:lora", "peft:ln_tuning"):
        model = rlrr.create_backbone(name).eval()
        cls = type(model)
        model = applied(model, method, fits=not (kind == "convnext" and method in ("hta", "apla")))
        if model is None:
            continue
        step(model, x)
        with torch.no_grad():
            ref = model(x).logits
            merged = rlrr.merge(model)
            assert type(merged) is cls and rel(merged(x).logits, ref) <= 1e-5


def test_hf_vit_base_discovers_the_paper_layers_and_count():
    """HF's ViT-B/16 layout (separate q/k/v, layernorm_before/after) gets exactly timm ViT-B's 288,768."""
    model = T.ViTForImageClassification(T.ViTConfig(num_labels=100))
    found = discover(model)
    assert [n.rsplit(".", 1)[-1] for n in found.targets[:6]] == ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]
    assert found.norms[0] == "vit.embeddings.patch_embeddings.projection" and found.norms[-1] == "vit.layernorm"
    assert rlrr.summary(rlrr.apply(model, rlrr.RLRRConfig()))["method_params"] == 288_768


def test_plain_transformers_trainer_trains_an_rlrr_model(tmp_path):
    """rlrr.apply on a transformers model, then an unmodified transformers.Trainer."""
    torch.manual_seed(0)
    model = rlrr.apply(MODELS["vit"](), rlrr.RLRRConfig())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in rlrr.trainable_parameters(model)}
    data = [{"pixel_values": torch.randn(3, 32, 32), "labels": i % 3} for i in range(8)]
    args = T.TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2,
                               learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True)
    T.Trainer(model=model, args=args, train_dataset=data).train()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    moved = [n for n, p in rlrr.trainable_parameters(model) if not torch.equal(p, before[n])]
    assert any(".scale_l" in n for n in moved) and "classifier.weight" in moved


def test_missing_hf_checkpoint_is_one_line_with_the_download_advice(tmp_path):
    with pytest.raises(rlrr.BackboneError, match="--model hf:DIR") as e:
        rlrr.create_backbone(f"hf:{tmp_path / 'nowhere'}")
    assert "\n" not in str(e.value)


# --- reach round 2: HF classes with unusual structure or configs ------------------------------------
TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
MORE = {
    "swinv2": (lambda: T.Swinv2ForImageClassification(T.Swinv2Config(
        embed_dim=16, depths=[1, 1], num_heads=[1, 2], image_size=32, patch_size=4, window_size=4, num_labels=3)), 32),
    "mobilenetv2 (TF padding)": (lambda: T.MobileNetV2ForImageClassification(T.MobileNetV2Config(
        image_size=32, depth_multiplier=0.35, num_labels=3)), 32),
    "resnet": (lambda: T.ResNetForImageClassification(T.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)), 32),
    "regnet": (lambda: T.RegNetForImageClassification(T.RegNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8, num_labels=3)), 32),
    "data2vec": (lambda: T.Data2VecVisionForImageClassification(T.Data2VecVisionConfig(**SMALL, num_labels=3)), 32),
    "siglip": (lambda: T.SiglipForImageClassification(T.SiglipConfig(
        vision_config=dict(SMALL), text_config=dict(TEXT), num_labels=3)), 32),
}


@pytest.mark.parametrize("kind", list(MORE))
def test_rlrr_round_trips_on_more_hf_classes(kind, tmp_path):
    make, side = MORE[kind]
    round_trip(make, torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1)), tmp_path)


def test_hf_list_image_size_without_a_processor_file(tmp_path):
    """Hiera and PVTv2 write image_size as [h, w]; a folder with no preprocessor_config.json still loads."""
    torch.manual_seed(0)
    T.HieraForImageClassification(T.HieraConfig(
        embed_dim=8, image_size=[64, 64], patch_size=[7, 7], patch_stride=[4, 4], patch_padding=[3, 3],
        depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], num_labels=3)).save_pretrained(tmp_path / "hiera")
    model = rlrr.create_backbone(f"hf:{tmp_path / 'hiera'}")
    assert model.pretrained_cfg["input_size"] == (3, 64, 64)
    assert rlrr.summary(rlrr.apply(model, rlrr.RLRRConfig()))["method_params"] > 0


def test_hf_resnet_rescales_the_main_path_norms_not_the_shortcut():
    model = MORE["resnet"][0]().eval()
    norms = discover(model).norms
    assert not any(".shortcut." in n for n in norms)
    block = "resnet.encoder.stages.0.layers.0"
    assert {f"{block}.layer.{i}.normalization" for i in range(3)} <= set(norms)


def test_siglip_unused_pooling_head_norm_is_not_rescaled():
    """The classifier reads the mean of the tokens; the attention-pooling head runs but never reaches it."""
    model = MORE["siglip"][0]().eval()
    assert "vision_model.head.layernorm" not in discover(model).norms
    model = rlrr.apply(model, rlrr.RLRRConfig())
    step(model, batch())
    assert all(p.grad is not None for _, p in rlrr.trainable_parameters(model))


def test_dense_output_projections_reach_apla_and_hta():
    for method, per_block in (("apla", 1), ("hta", 4)):
        model = rlrr.apply(MORE["data2vec"][0]().eval(), rlrr.make_config(method))
        wrapped = [n for n, m in model.named_modules() if type(m).__name__ in ("RowTunedLinear", "HTALinear")]
        assert len(wrapped) == per_block * 2, (method, wrapped)
        assert any(n.endswith("attention.output.dense") for n in wrapped)


def hf_folder(tmp_path, kind: str = "vit"):
    folder = tmp_path / kind
    torch.manual_seed(0)
    MODELS[kind]().save_pretrained(folder)
    return folder


def test_remote_code_folders_are_refused_without_a_prompt(tmp_path):
    import json
    folder = hf_folder(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModelForImageClassification": "m.Net"}}))
    (folder / "m.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(rlrr.BackboneError, match="auto_map in config.json.*never runs") as e:
        rlrr.create_backbone(f"hf:{folder}")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("damage", ["bad field", "truncated weights", "cut-short data", "pickled code", "text model"])
def test_broken_hf_folders_are_one_line_naming_the_problem(tmp_path, damage):
    import json
    import pickle
    folder = hf_folder(tmp_path)
    if damage == "bad field":
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "hidden_size": "wide"}))
        want = "config.json file"
    elif damage in ("truncated weights", "cut-short data"):  # cut in the header, or in the tensors' bytes
        w = folder / "model.safetensors"
        w.write_bytes(w.read_bytes()[:200] if damage == "truncated weights" else w.read_bytes()[:-100])
        want = f"{w} is damaged or cut short .* download it again"
    elif damage == "pickled code":
        (folder / "model.safetensors").unlink()

        class Evil:
            def __reduce__(self):
                return (print, ("pickled code ran",))
        (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Evil()}))
        want = "pickled code, which rlrr never runs"
    else:
        T.BertModel(T.BertConfig(**TEXT)).save_pretrained(folder)
        want = "is a Bert model, which transformers has no image classifier for"
    with pytest.raises(rlrr.BackboneError, match=want) as e:
        rlrr.create_backbone(f"hf:{folder}")
    assert "\n" not in str(e.value) and ("hf download" in str(e.value)) == (damage in ("truncated weights",
                                                                                    "cut-short data"))
