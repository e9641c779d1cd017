"""Round 2 of bad input (issue #19): peft adapters on the command line, numbers as people write them,
outputs that are inputs, silent wrong results (hidden folders, NaN adapters, class counts, image sizes,
leaked test images, EXIF), and one-line errors that name the file, line or flag and the fix."""
import csv
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
from fixtures import make_folder, make_vtab
from PIL import Image
from safetensors.torch import load_file, save_file
from test_hardening import CFG, TINY, err_line, train

import rlrr
from rlrr.cli import build_parser, main
from rlrr.data import DataError, build_data
from rlrr.data.images import open_rgb


@pytest.fixture
def task(tmp_path):
    return make_vtab(tmp_path / "data")


PRE = ("--weights", "pretrained")  # the shipped backbone: the same weights in every process


@pytest.fixture
def trained(task, tmp_path):
    """A finished 1-epoch RLRR run on the tiny VTAB-layout task."""
    out = tmp_path / "run"
    assert train(task, out, *PRE) == 0
    return out


def infer(*args) -> list[str]:
    return ["--model", "vit_pico_patch4_32", *PRE, *args]


# --- peft adapters from the command line ----------------------------------------------------------
def test_a_peft_adapter_evaluates_predicts_merges_and_exports(task, tmp_path, capsys):
    pytest.importorskip("peft")
    out = tmp_path / "peft"
    assert train(task, out, *PRE, "--method", "peft:lora") == 0, capsys.readouterr().err
    adapter = str(out / "adapter.safetensors")
    capsys.readouterr()
    assert main(["eval", *infer("--adapter", adapter), "--data", f"vtab1k:{task}"]) == 0
    top1 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["top1"]
    assert main(["predict", *infer("--adapter", adapter), "--images", str(task / "images"),
                 "--output", str(tmp_path / "p.csv"), "--topk", "3"]) == 0
    merged = tmp_path / "merged.safetensors"
    assert main(["merge", *infer("--adapter", adapter), "--output", str(merged)]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", "vit_pico_patch4_32", "--weights", str(merged), "--data", f"vtab1k:{task}"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["top1"] == pytest.approx(top1)
    pytest.importorskip("onnx")
    assert main(["export", *infer("--adapter", adapter), "--output", str(tmp_path / "m.onnx")]) == 0


def test_a_peft_tuner_that_cannot_merge_says_so(task, tmp_path, capsys):
    pytest.importorskip("peft")
    out = tmp_path / "lily"
    assert train(task, out, *PRE, "--method", "peft:lily") == 0, capsys.readouterr().err
    assert main(["merge", *infer("--adapter", str(out / "adapter.safetensors")), "--output",
                 str(tmp_path / "m.safetensors")]) == 2
    assert "cannot be merged" in err_line(capsys)


# --- numbers and types as people write them --------------------------------------------------------
def test_numbers_without_a_dot_are_numbers_in_configs_and_flags(task, tmp_path, capsys):
    cfg = tmp_path / "task.yaml"
    cfg.write_text("train:\n  lr: 1e-3\n  weight_decay: 1E-4\n  label_smoothing: .1\n  epochs: 1\n")
    out = tmp_path / "run"
    assert train(task, out, "--config", str(cfg), "--pace", "sigma=1e-1,lambda=1e-2") == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["weight_decay"] == 1e-4 and summary["method_config"]["sigma"] == 0.1
    assert summary["method_config"]["lam"] == 0.01


@pytest.mark.parametrize("yaml_line,want", [("epochs: 2.5", "epochs must be an integer, not 2.5"),
                                             ("lr: fast", "lr must be a number, not 'fast'"),
                                             ("epochs: 0", "--epochs must be at least 1, not 0"),
                                             ("epoch: 3", "unknown: ['epoch']")])
def test_a_bad_value_in_a_config_names_the_key_and_the_file(task, tmp_path, capsys, yaml_line, want):
    cfg = tmp_path / "task.yaml"
    cfg.write_text(f"train:\n  {yaml_line}\n")
    assert train(task, tmp_path / "run", "--config", str(cfg)) == 2
    line = err_line(capsys)
    assert want in line and str(cfg) in line


@pytest.mark.parametrize("flags,want", [
    (["--method-opt", "rank=abc"], "rlrr option: rank must be an integer, not 'abc'"),
    (["--method-opt", "rank=[1"], "--method-opt rank=[1 is not valid YAML"),
    (["--method-opt", "targets=blocks.(0"], "targets='blocks.(0' is not a valid regular expression"),
    (["--method", "rlrr+pace", "--pace"], "already has PACE; drop --pace or the +pace suffix"),
    (["--method", "peft:lora+pace"], "PACE wraps rlrr's own methods"),
    (["--pace", "sigma"], "--pace 'sigma' must look like key=value"),
    (["--pace", "sigma=1e30"], "PACE sigma must be in [0, 10]"),
    (["--method", "peft:lora", "--method-opt", "r=abc"], "peft lora option: r must be an integer, not 'abc'"),
    (["--output", ""], "--output: must not be empty"),
    (["--model", "convnext-tiny", "--weights", "pretrained"], "unknown model 'convnext-tiny'; did you mean convnext_tiny"),
])
def test_option_errors_name_the_flag_and_the_fix(task, tmp_path, capsys, flags, want):
    if "peft" in " ".join(flags):
        pytest.importorskip("peft")
    args = ["train", *TINY, "--data", f"vtab1k:{task}", "--output", str(tmp_path / "run"), *flags]
    assert main(args) == 2
    assert want in err_line(capsys)
    assert not (tmp_path / "run" / "summary.json").exists()


def test_pace_twice_is_refused_by_the_library_too():
    with pytest.raises(ValueError, match="applies PACE twice; use rlrr\\+pace"):
        rlrr.make_config("rlrr+pace+pace")


# --- outputs that are inputs ------------------------------------------------------------------------
def test_merge_and_export_refuse_to_overwrite_their_inputs(trained, tmp_path, capsys):
    adapter = trained / "adapter.safetensors"
    before = adapter.read_bytes()
    for cmd in ("merge", "export", "predict"):
        extra = ["--images", str(tmp_path)] if cmd == "predict" else []
        assert main([cmd, *infer("--adapter", str(adapter)), "--output", str(adapter), *extra]) == 2
        assert "is an input of this command" in err_line(capsys)
    assert adapter.read_bytes() == before


def test_hf_merge_refuses_its_source_folder_and_a_file(trained, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "vit"
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 image_size=32, patch_size=8, num_labels=10)
    transformers.ViTForImageClassification(cfg).save_pretrained(folder)
    model = rlrr.apply(rlrr.create_backbone(f"hf:{folder}"), rlrr.RLRRConfig())
    adapter = rlrr.save_adapter(model, tmp_path / "a.safetensors")
    before = (folder / "model.safetensors").read_bytes()
    capsys.readouterr()  # transformers' own progress bars while the test set up
    assert main(["merge", "--model", f"hf:{folder}", "--adapter", str(adapter), "--output", str(folder)]) == 2
    assert "is an input of this command" in err_line(capsys)
    assert (folder / "model.safetensors").read_bytes() == before
    (tmp_path / "file").write_text("x")
    assert main(["merge", "--model", f"hf:{folder}", "--adapter", str(adapter), "--output", str(tmp_path / "file")]) == 2
    assert "is a file; a merged hf: model is a folder" in err_line(capsys)


# --- silent wrong results -------------------------------------------------------------------------
def test_hidden_folders_are_no_class_and_empty_classes_are_refused(tmp_path):
    root = make_folder(tmp_path / "f")
    classes = sorted(d.name for d in root.iterdir())
    (root / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8)).save(root / ".ipynb_checkpoints" / "x.png")
    splits = build_data(f"folder:{root}", CFG)
    assert splits.num_classes == len(classes)
    assert all(not any(part.startswith(".") for part in p.parts) for p, _ in splits.trainval.items + splits.test.items)
    (root / "class_empty").mkdir()
    with pytest.raises(DataError, match="class_empty hold no images"):
        build_data(f"folder:{root}", CFG)


def test_an_adapter_with_nan_is_refused_naming_the_tensor(trained, tmp_path, capsys):
    from safetensors import safe_open
    src = trained / "adapter.safetensors"
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(src))
    name = next(n for n in tensors if n.endswith("scale_l"))
    tensors[name][0, 0, 0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    assert main(["merge", *infer("--adapter", str(bad)), "--output", str(tmp_path / "m.safetensors")]) == 2
    line = err_line(capsys)
    assert name in line and "NaN or Inf" in line and not (tmp_path / "m.safetensors").exists()


def test_eval_refuses_a_head_that_does_not_fit_the_task(trained, tmp_path, capsys):
    other = make_vtab(tmp_path / "d2", task="cifar")  # 100 classes by the VTAB table
    assert main(["eval", *infer("--adapter", str(trained / "adapter.safetensors")), "--data", f"vtab1k:{other}"]) == 2
    assert "head has 10 classes but vtab1k:" in err_line(capsys)


def test_predict_header_has_the_columns_it_writes(trained, task, tmp_path):
    out = tmp_path / "p.csv"
    assert main(["predict", *infer("--adapter", str(trained / "adapter.safetensors")), "--images",
                 str(task / "images"), "--output", str(out), "--topk", "50"]) == 0
    rows = list(csv.reader(out.open()))
    assert len(rows[0]) == 21 and {len(r) for r in rows} == {21}


def test_predict_takes_files_and_folders_and_can_skip_bad_images(trained, task, tmp_path, capsys):
    images = sorted((task / "images").iterdir())
    hidden = task / "images" / ".ipynb_checkpoints"
    hidden.mkdir()
    (hidden / "0000-checkpoint.png").write_bytes(images[0].read_bytes())
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    out, adapter = tmp_path / "p.csv", ("--adapter", str(trained / "adapter.safetensors"))
    assert main(["predict", *infer(*adapter), "--images", str(images[1]), str(task / "images"), "--output", str(out)]) == 0
    paths = [r[0] for r in list(csv.reader(out.open()))[1:]]
    assert paths == [str(images[1])] + [str(p) for p in images]  # files as given, folders searched, hidden left out
    assert main(["predict", *infer(*adapter), "--images", str(tmp_path / "nope.jpg"), "--output", str(out)]) == 2
    assert "--images " + str(tmp_path / "nope.jpg") + ": no such image file or folder" in err_line(capsys)
    assert main(["predict", *infer(*adapter), "--images", str(bad), str(images[2]), "--output", str(out)]) == 2
    assert f"image {bad} is unreadable" in err_line(capsys)
    assert main(["predict", *infer(*adapter), "--images", str(bad), str(images[2]), "--output", str(out),
                 "--skip-bad-images"]) == 0
    assert [r[0] for r in list(csv.reader(out.open()))[1:]] == [str(images[2])]
    assert f"skipped 1 unreadable image(s), first {bad}" in capsys.readouterr().out


def test_class_names_travel_from_folder_names_to_predictions(tmp_path):
    root = make_folder(tmp_path / "f", n=40)
    out = tmp_path / "run"
    assert main(["train", *TINY, *PRE, "--data", f"folder:{root}", "--output", str(out)]) == 0
    names = sorted(d.name for d in root.iterdir())
    assert rlrr.adapter.class_names(rlrr.adapter.read_adapter(out / "adapter.safetensors")[1], len(names)) == names
    csv_out = tmp_path / "p.csv"
    assert main(["predict", *infer("--adapter", str(out / "adapter.safetensors")), "--images", str(root),
                 "--output", str(csv_out), "--topk", "2"]) == 0
    rows = list(csv.reader(csv_out.open()))[1:]
    assert rows and all(r[1] in names and r[3] in names for r in rows)


def test_bench_lists_drop_blanks_and_repeats_and_seeds_are_integers(capsys):
    args = build_parser().parse_args(["bench", "--methods", "linear,,linear, rlrr", "--seeds", "0,1,0"])
    assert args.methods == ["linear", "rlrr"] and args.seeds == [0, 1]
    assert main(["bench", "--seeds", "0,x"]) == 2
    assert "'x' is not an integer" in err_line(capsys)


def test_an_adapter_remembers_its_image_size(task, tmp_path, capsys):
    out = tmp_path / "run64"
    base = ["--model", "vit_tiny_patch16_224", "--weights", "none", "--no-progress", "--epochs", "1",
            "--warmup-epochs", "0", "--batch-size", "16"]
    assert main(["train", *base, "--img-size", "64", "--data", f"vtab1k:{task}", "--output", str(out)]) == 0
    adapter = str(out / "adapter.safetensors")
    capsys.readouterr()
    assert main(["eval", "--model", "vit_tiny_patch16_224", "--weights", "none", "--adapter", adapter,
                 "--ignore-fingerprint", "--data", f"vtab1k:{task}"]) == 0  # the size comes from the adapter
    fresh = rlrr.create_backbone("vit_tiny_patch16_224", weights=None, num_classes=10)
    with pytest.raises(rlrr.AdapterMismatchError, match="trained at input size 64×64 .* --img-size 64"):
        rlrr.load_adapter(fresh, adapter)


def test_repeated_and_leaked_images_are_warned_with_counts(task, caplog):
    lines = (task / "train800.txt").read_text().splitlines()
    test_line = (task / "test.txt").read_text().splitlines()[0]
    (task / "train800.txt").write_text("\n".join(lines + lines[:2] + [test_line]) + "\n")
    (task / "train800val200.txt").write_text("\n".join(lines + [test_line]) + "\n")
    build_data(f"vtab1k:{task}", CFG)
    assert "2 image(s) listed more than once in the train split" in caplog.text
    assert "1 test image(s) are also in the training lists" in caplog.text


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = 255  # left half white
    img = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: the viewer turns it 90° clockwise
    img.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    upright = np.asarray(open_rgb(tmp_path / "phone.jpg"))
    assert upright.shape[:2] == (40, 20) and upright[:20].mean() > 200 and upright[20:].mean() < 50


# --- one line that a user can act on ------------------------------------------------------------------
@pytest.mark.parametrize("line,want", [("images/0000.png 1000000000000", "test.txt:1: label 1000000000000 would mean"),
                                       ("images/0000.png x", "test.txt:1: label 'x' is not a class id")])
def test_bad_labels_in_split_lists_name_the_line(task, line, want):
    (task / "test.txt").write_text(line + "\n")
    with pytest.raises(DataError, match=want):
        build_data(f"vtab1k:{task}", CFG)


def test_a_byte_order_mark_is_not_part_of_the_first_path(task):
    for name in ("train800.txt", "val200.txt", "train800val200.txt", "test.txt"):
        f = task / name
        f.write_bytes(b"\xef\xbb\xbf" + f.read_bytes())
    splits = build_data(f"vtab1k:{task}", CFG)
    assert splits.train.items[0][0].name == "0000.png" and splits.train.items[0][0].is_file()


@pytest.mark.parametrize("row,want", [("a.png,3\nb.png,cat", ":3: label 'cat' is a class name but line 2 has the "
                                                              "class id '3'; use ids (0, 1, ...) or names, not both"),
                                      ("a.png,", ":2: label '' is not a class id"),
                                      ("3,a.png", ":2: ['3', 'a.png'] looks like 'label,path'")])
def test_bad_csv_rows_name_the_line(tmp_path, row, want):
    f = tmp_path / "l.csv"
    f.write_text("\ufeffpath,label\n" + row + "\n")
    with pytest.raises(DataError, match=re.escape(want)):
        build_data(f"csv:{f}", CFG)


@pytest.mark.parametrize("meta,want", [({"config": "{not json"}, "metadata 'config' is not JSON"),
                                       ({"method": None}, "metadata has no 'method'")])
def test_adapter_metadata_errors_are_one_line(trained, tmp_path, capsys, meta, want):
    from safetensors import safe_open
    src = trained / "adapter.safetensors"
    with safe_open(str(src), framework="pt") as f:
        old = f.metadata()
    new = {k: v for k, v in {**old, **meta}.items() if v is not None}
    save_file(load_file(str(src)), str(tmp_path / "a.safetensors"), metadata=new)
    assert main(["eval", *infer("--adapter", str(tmp_path / "a.safetensors")), "--data", "offline:digits"]) == 2
    assert want in err_line(capsys)


def test_bench_cells_that_cannot_be_read_say_to_delete_them(tmp_path, capsys):
    out = tmp_path / "b"
    cell = out / "mnist" / "linear" / "seed0"
    cell.mkdir(parents=True)
    (cell / "summary.json").write_text('{"test_acc": 1')
    args = ["bench", "--smoke", "--methods", "linear", "--seeds", "0", "--output", str(out)]
    assert main(args) == 2
    assert f"delete {cell} to re-run" in err_line(capsys)
    (cell / "summary.json").unlink()
    (cell / "checkpoint.pt").write_bytes(b"garbage")
    assert main(args) == 2
    line = err_line(capsys)
    assert f"delete {cell} to re-run" in line and "--overwrite" not in line


def test_a_dataloader_worker_error_shows_the_workers_message(task, tmp_path, capsys):
    (task / "images" / "0003.png").write_bytes(b"")
    assert train(task, tmp_path / "run", "--num-workers", "1") == 2
    line = err_line(capsys)
    assert "0003.png is unreadable or truncated" in line and "worker process" not in line


def test_ctrl_c_during_training_says_how_to_resume(task, tmp_path):
    out = tmp_path / "run"
    code = ("import sys; from rlrr.cli import main; sys.exit(main(sys.argv[1:]))")
    args = ["train", *TINY[:-2], "--epochs", "200", "--data", f"vtab1k:{task}", "--output", str(out)]
    # Ctrl-C as in a terminal, also where the suite runs as a background job (whose children ignore SIGINT)
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for _ in range(3000):  # until the first checkpoint (up to 5 min on a loaded machine): then the interrupt lands mid-training
        if (out / "checkpoint.pt").exists() or proc.poll() is not None:
            break
        import time
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1].strip()
    assert proc.returncode == 130 and "Traceback" not in err
    assert err.splitlines()[-1] == "error: interrupted; rerun with --resume to continue from the last checkpoint"
