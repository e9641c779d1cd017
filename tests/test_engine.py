"""Trainer and CLI end to end on tiny real data: outputs, resume, NaN stop, DDP, merge/export/predict."""
import json
import os
import subprocess
import sys

import pytest
import torch
from fixtures import make_vtab
from safetensors.torch import load_file

import rlrr
from rlrr.cli import main
from rlrr.engine import loop, trainer as trainer_mod
from rlrr.engine.trainer import TrainConfig, Trainer, TrainingStopped

TINY = ["--model", "vit_pico_patch4_32", "--weights", "none", "--no-progress", "--batch-size", "8",
        "--warmup-epochs", "1", "--lr", "3e-3"]


def train(tmp_path, *extra):
    task = make_vtab(tmp_path / "data")
    out = tmp_path / "run"
    rc = main(["train", *TINY, "--data", f"vtab1k:{task}", "--output", str(out), "--epochs", "2", *extra])
    return rc, task, out


def test_train_writes_every_output(tmp_path):
    rc, task, out = train(tmp_path)
    assert rc == 0
    for f in ("summary.json", "metrics.jsonl", "metrics.csv", "curves.png", "adapter.safetensors",
              "best_adapter.safetensors", "checkpoint.pt"):
        assert (out / f).is_file(), f
    s = json.loads((out / "summary.json").read_text())
    assert s["protocol"] == "retrain" and s["num_classes"] == 10 and s["method"] == "rlrr"
    hist = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in hist] == ["select"] * 2 + ["final"] * s["selected_epoch"]
    assert all("test_acc" not in r for r in hist)  # honest protocol: test never seen during training
    assert s["config"]["lr"] == 3e-3 and s["config"]["weight_decay"] == 5e-5  # CLI over configs/vtab1k/svhn.yaml


def test_select_on_test_is_labelled(tmp_path):
    rc, _, out = train(tmp_path, "--select-on-test")
    s = json.loads((out / "summary.json").read_text())
    assert rc == 0 and s["protocol"] == "test" and "official" in s["selection"]
    hist = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert s["test_acc"] == max(r["test_acc"] for r in hist)


def _trainer(task, out, epochs=3):
    torch.manual_seed(0)  # the same random backbone each time (no pretrained weights in tests)
    base = rlrr.create_backbone("vit_pico_patch4_32", weights=None, num_classes=10)
    from timm.data import resolve_data_config
    from rlrr.data import build_data
    splits = build_data(f"vtab1k:{task}", resolve_data_config({}, model=base))
    cfg = TrainConfig(epochs=epochs, warmup_epochs=1, batch_size=8, lr=3e-3, deterministic=True, protocol="val",
                      progress=False)
    import copy
    return Trainer(lambda: rlrr.apply(copy.deepcopy(base), rlrr.RLRRConfig()), splits, cfg, out)


def test_resume_reaches_the_same_result(tmp_path, monkeypatch):
    task = make_vtab(tmp_path / "data")
    full = _trainer(task, tmp_path / "full").fit()
    real = loop.train_one_epoch
    calls = {"n": 0}

    def crash_in_third_epoch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(trainer_mod, "train_one_epoch", crash_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        _trainer(task, tmp_path / "cut").fit()
    monkeypatch.setattr(trainer_mod, "train_one_epoch", real)
    resumed = _trainer(task, tmp_path / "cut").fit(resume=True)
    assert resumed["test_acc"] == full["test_acc"] and resumed["val_acc"] == full["val_acc"]
    a = load_file(str(tmp_path / "full" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    task = make_vtab(tmp_path / "data")
    t = _trainer(task, tmp_path / "nan")
    train_ds = t.splits.train
    n = {"calls": 0}

    class Poisoned(torch.utils.data.Dataset):  # good for one epoch, NaN afterwards
        def __len__(self):
            return len(train_ds)

        def __getitem__(self, i):
            n["calls"] += 1
            x, y = train_ds[i]
            return (x * float("nan") if n["calls"] > len(train_ds) else x), y

    t.splits.train = Poisoned()
    with pytest.raises(TrainingStopped, match=r"loss is nan at epoch 1, batch 0.*last good checkpoint: .*epoch 0"):
        t.fit()
    ck = torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)
    assert json.loads(ck["state"])["epoch"] == 1


def test_cli_errors_are_one_line(tmp_path, capsys):
    task = make_vtab(tmp_path / "data")
    (task / "test.txt").unlink()
    assert main(["train", *TINY, "--data", f"vtab1k:{task}", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: split file") and "test.txt" in err and "\n" not in err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    (task / "test.txt").write_text("images/0000.png 1\n")
    assert main(["train", *TINY, "--data", f"vtab1k:{task}", "--output", str(blocker / "out")]) == 2
    assert "not writable" in capsys.readouterr().err
    assert main(["train", *TINY, "--data", f"vtab1k:{task}", "--output", str(tmp_path / "o"), "--method", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_merge_eval_predict_export_info(tmp_path, capsys):
    rc, task, out = train(tmp_path)
    adapter = str(out / "adapter.safetensors")
    torch.manual_seed(0)  # the backbone the run trained on (train seeds 0 before creating it)
    base = rlrr.create_backbone("vit_pico_patch4_32", weights=None, num_classes=10)
    from safetensors.torch import save_file
    save_file(base.state_dict(), str(tmp_path / "base.safetensors"))
    model_args = ["--model", "vit_pico_patch4_32", "--weights", str(tmp_path / "base.safetensors")]
    assert main(["merge", *model_args, "--adapter", adapter, "--output", str(tmp_path / "merged.safetensors")]) == 0
    merged = load_file(str(tmp_path / "merged.safetensors"))
    assert set(merged) == set(base.state_dict())
    assert main(["eval", *model_args, "--adapter", adapter, "--data", f"vtab1k:{task}"]) == 0
    a = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", "--model", "vit_pico_patch4_32", "--weights", str(tmp_path / "merged.safetensors"),
                 "--data", f"vtab1k:{task}"]) == 0
    b = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert a["top1"] == b["top1"] and a["n"] == 30  # merged = unmerged
    assert main(["predict", *model_args, "--adapter", adapter, "--images", str(task / "images"),
                 "--output", str(tmp_path / "p.csv"), "--topk", "3"]) == 0
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert len(rows) == 81 and rows[0].startswith("path,class_1,prob_1")
    assert main(["info", "--model", "vit_base_patch16_224", "--weights", "none", "--num-classes", "100"]) == 0
    assert "288,768" in capsys.readouterr().out
    rc = main(["export", *model_args, "--adapter", adapter, "--output", str(tmp_path / "m.onnx")])
    assert rc == 0, capsys.readouterr().err
    import onnx
    m = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(m)
    assert m.graph.input[0].name == "image" and (tmp_path / "m.onnx").stat().st_size > 4e6  # fp32 weights inside


DDP_SCRIPT = r"""
import copy, sys, torch, rlrr
from pathlib import Path
from timm.data import resolve_data_config
from rlrr.data import build_data
from rlrr.engine.trainer import TrainConfig, Trainer
task, out = sys.argv[1], Path(sys.argv[2])
torch.manual_seed(0)
base = rlrr.create_backbone("vit_pico_patch4_32", weights=None, num_classes=10)
splits = build_data(f"vtab1k:{task}", resolve_data_config({}, model=base))
cfg = TrainConfig(epochs=2, warmup_epochs=1, batch_size=8, lr=3e-3, protocol="val", progress=False, device="cpu")
t = Trainer(lambda: rlrr.apply(copy.deepcopy(base), rlrr.RLRRConfig()), splits, cfg, out)
t.fit()
import torch.distributed as td
state = {n: p.detach() for n, p in rlrr.trainable_parameters(t.last_model)}
torch.save(state, out / f"rank{td.get_rank()}.pt")
"""


def test_ddp_two_cpu_processes_stay_in_sync(tmp_path):
    task = make_vtab(tmp_path / "data")
    (tmp_path / "ddp.py").write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                        str(tmp_path / "ddp.py"), str(task), str(tmp_path / "out")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a = torch.load(tmp_path / "out" / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "out" / "rank1.pt", weights_only=True)
    assert a.keys() == b.keys() and len(a) > 10
    assert all(torch.equal(a[k], b[k]) for k in a)
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["world_size"] == 2


def test_plots_leave_the_callers_matplotlib_alone_and_are_whole_files(tmp_path):
    import matplotlib
    matplotlib.use("svg")  # a caller's own backend choice
    import matplotlib.pyplot as plt
    from rlrr.engine.report import plot_history
    history = [{"phase": "train", "epoch": e, "train_loss": 1 / (e + 1), "train_acc": 10 * e, "val_loss": 1.0,
                "val_acc": 5 * e, "lr": 1e-3} for e in range(3)]
    plot_history(history, tmp_path / "curves.png", "t")
    assert matplotlib.get_backend() == "svg" and plt.get_fignums() == []
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]  # no temp file left


def test_inference_commands_read_each_file_once_and_build_once(tmp_path, monkeypatch, capsys):
    """The one loading path: an adapter (or a merged checkpoint) is read once and the backbone built once,
    with the class count and the input size (an adapter trained at 48 px) decided before building."""
    import timm
    from rlrr import adapter as adapter_mod
    from rlrr import backbones
    model = rlrr.apply(rlrr.create_backbone("vit_pico_patch4_32", num_classes=4, img_size=48), rlrr.RLRRConfig())
    path = rlrr.save_adapter(model, tmp_path / "a.safetensors", {"class_names": json.dumps(list("wxyz"))})
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in rlrr.merge(model).state_dict().items()}, str(tmp_path / "m.safetensors"))
    images = tmp_path / "imgs"
    images.mkdir()
    from PIL import Image
    Image.new("RGB", (40, 40), (200, 10, 10)).save(images / "0.png")
    counts = {"adapter": 0, "state_dict": 0, "create": 0}

    def counted(name, fn):
        def wrapper(*a, **k):
            counts[name] += 1
            return fn(*a, **k)
        return wrapper
    monkeypatch.setattr(adapter_mod, "read_adapter", counted("adapter", adapter_mod.read_adapter))
    monkeypatch.setattr(backbones, "read_state_dict", counted("state_dict", backbones.read_state_dict))
    monkeypatch.setattr(timm, "create_model", counted("create", timm.create_model))
    assert main(["predict", "--adapter", str(path), "--images", str(images), "--output", str(tmp_path / "p.csv")]) == 0
    assert counts == {"adapter": 1, "state_dict": 1, "create": 1}  # the shipped backbone's weights, once
    assert (tmp_path / "p.csv").read_text().splitlines()[1].split(",")[1] in "wxyz"  # names from the one read
    counts.update(adapter=0, state_dict=0, create=0)
    assert main(["predict", "--weights", str(tmp_path / "m.safetensors"), "--img-size", "48", "--images", str(images),
                 "--output", str(tmp_path / "q.csv")]) == 0
    assert counts == {"adapter": 0, "state_dict": 1, "create": 1}  # its own 4-class head, from the one read
    assert len((tmp_path / "q.csv").read_text().splitlines()[1].split(",")) == 1 + 2 * 4
