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
    pre = [a if a != "none" else "pretrained" for a in args]  # eval/predict need the weights the adapter knows
    assert main([*pre, "--output", str(tmp_path / "pre")]) == 0
    look = ["--model", "vit_pico_patch4_32", "--weights", "pretrained", "--adapter",
            str(tmp_path / "pre" / "adapter.safetensors")]
    for extra in ([], ["--compile", "aot_eager"]):  # eval and predict compiled give what they give uncompiled
        assert main(["eval", *look, "--data", f"vtab1k:{task}", *extra]) == 0
        assert main(["predict", *look, "--images", str(task / "images"), "--output",
                     str(tmp_path / f"pred{len(extra)}.csv"), *extra]) == 0
    evals = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(evals) == 2 and evals[0] == evals[1]
    assert (tmp_path / "pred0.csv").read_text() == (tmp_path / "pred2.csv").read_text()
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
    merged = tmp_path / "svhn_rlrr.safetensors"  # a merged model gets its card too
    assert main(["merge", "--model", "vit_pico_patch4_32", "--weights", "none", "--ignore-fingerprint", "--adapter",
                 str(out / "adapter.safetensors"), "--output", str(merged)]) == 0
    from safetensors.torch import load_file
    card = ModelCard.load(merged.with_name("svhn_rlrr.README.md"))
    assert card.data.library_name == "rlrr" and "merged" in card.data.tags
    assert card.data.eval_results[0].metric_value == round(summary["test_acc"], 2)  # from the run beside the adapter
    extra = card.data.to_dict()["rlrr"]
    assert extra["merged"] and extra["method"] == "rlrr" and extra["num_classes"] == summary["num_classes"]
    assert extra["params"] == sum(t.numel() for t in load_file(merged).values())
    assert extra["adapter_backbone_fingerprint"] == summary["settings"]["backbone_fingerprint"]
    assert 'timm.create_model("vit_pico_patch4_32", pretrained=False' in card.text


def wandb_records(run_dir):
    """Every record of a W&B offline run file, decoded with wandb's own protobuf messages (the file is
    LevelDB's log format: 32 KiB blocks of checksum, length, type, payload)."""
    import struct
    from wandb.proto import wandb_internal_pb2 as pb
    data = next(run_dir.rglob("run-*.wandb")).read_bytes()
    pos, chunks, part = 7, [], b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        part = chunk if kind in (1, 2) else part + chunk
        if kind in (1, 4):
            chunks.append(part)
    records = []
    for c in chunks:
        r = pb.Record()
        r.ParseFromString(c)
        records.append(r)
    return records


def test_log_sends_each_run_to_tensorboard_mlflow_and_wandb_read_back_by_their_own_readers(tmp_path, monkeypatch):
    import json
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from rlrr.cli import main
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "grid"
    assert main(["bench", "--suite", "offline:digits", "--seeds", "0", "--methods", "linear", "--epochs", "2",
                 "--log", "tensorboard,mlflow,wandb", "--output", str(out)]) == 0
    cell = out / "digits" / "linear" / "seed0"
    res = json.loads((cell / "summary.json").read_text())
    rows = [json.loads(line) for line in (cell / "metrics.jsonl").read_text().splitlines()]
    ea = EventAccumulator(str(cell / "tensorboard"))
    ea.Reload()
    assert [e.value for e in ea.Scalars("val_acc")] == pytest.approx([r["val_acc"] for r in rows])
    assert [e.value for e in ea.Scalars("lr")] == pytest.approx([r["lr"] for r in rows])
    assert ea.Scalars("final/test_acc")[0].value == pytest.approx(res["test_acc"])
    assert "curves" in ea.Tags()["images"]
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("grid").experiment_id])
    assert run.info.run_name == "digits/linear/seed0" and run.info.status == "FINISHED"
    assert run.data.params["method"] == "linear" and float(run.data.params["lr"]) == res["config"]["lr"]
    assert int(run.data.params["params.trainable_params"]) == res["trainable_params"]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val_acc")] == \
        pytest.approx([r["val_acc"] for r in rows])
    assert run.data.metrics["final_test_acc"] == pytest.approx(res["test_acc"])
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["curves.png"]
    records = wandb_records(cell / "wandb")
    (start,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (start.run_group, start.display_name) == ("grid", "digits/linear/seed0")
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [h["val_acc"] for h in history if "val_acc" in h] == pytest.approx([r["val_acc"] for r in rows])
    summary = {i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "summary"
               for i in r.summary.update if i.key}
    assert summary["test_acc"] == pytest.approx(res["test_acc"])


def test_log_names_a_missing_tracker_library_or_an_unknown_tracker_in_one_line(tmp_path, monkeypatch, capsys):
    import sys
    from rlrr.cli import main
    args = ["train", "--data", "offline:digits", "--method", "linear", "--epochs", "1", "--output", str(tmp_path / "r")]
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    assert main(args + ["--log", "wandb"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'rlrr[track]'" in err
    assert main(args + ["--log", "tensorboard,neptune"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'neptune' is not a tracker" in err
    assert not (tmp_path / "r" / "summary.json").exists()
