"""Bad input and faults, tried as a new user would: each ends in one `error:` line that names the fix,
and no finished work is lost (issue #13's table, one test per row or neighbourhood)."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import make_vtab
from PIL import Image

import rlrr
from rlrr.adapter import read_adapter
from rlrr.cli import main
from rlrr.data import DataError, build_data
from rlrr.data.images import open_rgb
from rlrr.engine.trainer import run_lock

TINY = ["--model", "vit_pico_patch4_32", "--weights", "none", "--no-progress", "--batch-size", "8",
        "--warmup-epochs", "0", "--lr", "3e-3", "--epochs", "1"]
CFG = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear", "crop_pct": 1.0}


def err_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def train(task: Path, out: Path, *extra) -> int:
    return main(["train", *TINY, "--data", f"vtab1k:{task}", "--output", str(out), *extra])


@pytest.fixture
def task(tmp_path):
    return make_vtab(tmp_path / "data")


# --- --img-size -----------------------------------------------------------------------------------
def test_img_size_follows_the_model_built(task, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "vit_tiny_patch16_224", "--weights", "none", "--img-size", "64", "--no-progress",
                 "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "16", "--data", f"vtab1k:{task}",
                 "--output", str(out)]) == 0, capsys.readouterr().err
    assert json.loads(read_adapter(out / "adapter.safetensors")[1]["input_size"]) == [3, 64, 64]
    assert main(["train", "--model", "vit_tiny_patch16_224", "--weights", "none", "--img-size", "7", "--no-progress",
                 "--data", f"vtab1k:{task}", "--output", str(tmp_path / "r7")]) == 2
    assert "patch size (16, 16)" in err_line(capsys)


# --- data -----------------------------------------------------------------------------------------
def test_any_folder_with_the_vtab_lists_is_a_task(tmp_path, caplog):
    mine = make_vtab(tmp_path / "d", task="my_own_task")
    splits = build_data(f"vtab1k:{mine}", CFG)
    labels = {y for part in ("train", "val", "test") for _, y in splits[part].items}
    assert splits.num_classes == max(labels) + 1 and "not one of the 19 VTAB-1k tasks" in caplog.text
    assert build_data(f"vtab1k:{mine}", CFG, num_classes=12).num_classes == 12


@pytest.mark.parametrize("split", ["train800.txt", "val200.txt", "test.txt"])
def test_an_empty_split_list_names_the_file(task, split):
    (task / split).write_text("\n")
    with pytest.raises(DataError, match=f"{split} lists no images"):
        build_data(f"vtab1k:{task}", CFG)


@pytest.mark.parametrize("line", ["../../x.png 1", "/etc/hostname 1", "images/../../data/svhn/images/0000.png 1"])
def test_split_lines_stay_inside_the_task_folder(task, line):
    with open(task / "train800.txt", "a") as f:
        f.write(line + "\n")
    with pytest.raises(DataError, match="points outside"):
        build_data(f"vtab1k:{task}", CFG)


def test_images_of_any_mode_keep_their_range(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I;16")
    got = np.asarray(open_rgb(tmp_path / "g16.png"))[..., 0]
    assert len(np.unique(got)) > 200 and got.min() == 0 and got.max() == 255  # a ramp, not black and white
    Image.fromarray(np.full((8, 8), 0.5, np.float32), "F").save(tmp_path / "f.tiff")
    assert abs(int(np.asarray(open_rgb(tmp_path / "f.tiff"))[0, 0, 0]) - 128) <= 1
    for mode in ("RGBA", "LA", "P", "CMYK", "1"):
        Image.new(mode, (8, 8)).save(tmp_path / f"m.{'tiff' if mode == 'CMYK' else 'png'}")
        assert open_rgb(tmp_path / f"m.{'tiff' if mode == 'CMYK' else 'png'}").mode == "RGB"


def test_decompression_bomb_is_one_line(tmp_path, monkeypatch):
    Image.new("L", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's own limit, lowered to make a small bomb
    with pytest.raises(DataError, match="decompression-bomb limit"):
        open_rgb(tmp_path / "big.png")


# --- numbers, files, configs ---------------------------------------------------------------------
@pytest.mark.parametrize("flag,value", [("--epochs", "0"), ("--epochs", "-1"), ("--batch-size", "0"), ("--lr", "0"),
                                        ("--lr", "nan"), ("--grad-accum", "0"), ("--label-smoothing", "1"),
                                        ("--warmup-epochs", "-2"), ("--weight-decay", "-1"), ("--clip-grad", "0")])
def test_numeric_flags_are_checked_where_they_enter(task, tmp_path, capsys, flag, value):
    assert train(task, tmp_path / "o", flag, value) == 2
    assert flag in err_line(capsys)
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


def test_inference_flags_and_output_paths_are_checked(task, tmp_path, capsys):
    assert main(["eval", "--model", "vit_pico_patch4_32", "--data", f"vtab1k:{task}", "--batch-size", "0"]) == 2
    assert "--batch-size" in err_line(capsys)
    assert main(["predict", "--images", str(task / "images"), "--output", str(tmp_path)]) == 2
    assert "is a folder" in err_line(capsys)
    for cmd in ("merge", "export"):
        assert main([cmd, "--adapter", "a.safetensors", "--output", str(tmp_path)]) == 2
        assert "is a folder" in err_line(capsys)


def test_bad_weights_checkpoint_and_config_files_are_one_line(task, tmp_path, capsys):
    good = tmp_path / "w.safetensors"
    from safetensors.torch import save_file
    save_file(rlrr.create_backbone("vit_pico_patch4_32", weights=None).state_dict(), str(good))
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:5000])
    assert main(["eval", "--model", "vit_pico_patch4_32", "--weights", str(tmp_path / "cut.safetensors"),
                 "--data", f"vtab1k:{task}"]) == 2
    assert "not a readable safetensors" in err_line(capsys)
    (tmp_path / "bad.yaml").write_text("train: {lr: [1, 2\n")
    assert train(task, tmp_path / "o", "--config", str(tmp_path / "bad.yaml")) == 2
    assert "not valid YAML at line" in err_line(capsys)
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"\x80\x04garbage")
    assert train(task, out, "--resume") == 2
    assert "not a readable rlrr checkpoint" in err_line(capsys)


def test_weights_may_be_a_downloaded_hub_folder(task, tmp_path, capsys):
    from safetensors.torch import save_file
    torch.manual_seed(3)
    src = rlrr.create_backbone("vit_pico_patch4_32", weights=None)
    repo = tmp_path / "vit_pico"  # what `huggingface-cli download timm/<name> --local-dir DIR` leaves
    repo.mkdir()
    save_file(src.state_dict(), str(repo / "model.safetensors"))
    (repo / "config.json").write_text('{"architecture": "vit_pico_patch4_32"}')
    loaded = rlrr.create_backbone("vit_pico_patch4_32", weights=repo)
    assert rlrr.backbones.fingerprint(loaded) == rlrr.backbones.fingerprint(src)
    run = tmp_path / "run"
    assert main(["train", "--model", "vit_pico_patch4_32", "--weights", str(repo), "--data", f"vtab1k:{task}",
                 "--epochs", "1", "--output", str(run), "--no-progress"]) == 0
    infer = ["--model", "vit_pico_patch4_32", "--weights", str(repo), "--adapter", str(run / "adapter.safetensors")]
    assert main(["merge", *infer, "--output", str(repo / "model.safetensors")]) == 2  # the folder's file is an input
    assert "is an input of this command" in err_line(capsys)
    (repo / "model.safetensors").unlink()
    assert main(["eval", *infer, "--data", f"vtab1k:{task}"]) == 2
    assert "holds none of model.safetensors, pytorch_model.bin" in err_line(capsys)


def test_unexpected_errors_are_one_line_with_the_debug_hint(monkeypatch, capsys):
    def broken(args):
        return 1 / 0
    monkeypatch.setattr("rlrr.cli.model.cmd_info", broken)
    assert main(["info"]) == 2
    assert "unexpected ZeroDivisionError" in (e := err_line(capsys)) and "RLRR_DEBUG=1" in e


def adapter_content(out: Path) -> tuple:
    """Tensors and metadata of a run's adapter (safetensors' header order is not stable across writes)."""
    tensors, meta = rlrr.adapter.read_adapter(out / "adapter.safetensors")
    return sorted((k, v.numpy().tobytes()) for k, v in tensors.items()), meta


# --- runs never destroy work ----------------------------------------------------------------------
def test_finished_runs_need_resume_or_overwrite(task, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(task, out) == 0
    before = adapter_content(out)
    assert train(task, out, "--seed", "1") == 2
    assert "holds a finished run" in err_line(capsys)
    assert adapter_content(out) == before
    assert train(task, out, "--resume") == 0  # continue: nothing left to train, same result
    assert adapter_content(out) == before
    assert train(task, out, "--seed", "1", "--overwrite") == 0
    assert json.loads((out / "summary.json").read_text())["config"]["seed"] == 1


@pytest.mark.parametrize("change", [("--lr", "1e-2"), ("--epochs", "3"), ("--method", "lora"), ("--seed", "5")])
def test_resume_refuses_other_settings(task, tmp_path, capsys, change):
    out = tmp_path / "run"
    assert train(task, out) == 0
    assert train(task, out, *change, "--resume") == 2
    err = err_line(capsys)
    assert f"{change[0][2:].replace('-', '_')}=" in err and "was saved with" in err and "--overwrite" in err


def test_a_folder_in_use_is_refused_and_a_crashed_holder_does_not_block(task, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with run_lock(out):
        assert train(task, out) == 2
        assert "in use by another running rlrr train" in err_line(capsys)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from rlrr.engine.trainer import run_lock\nwith run_lock(Path(sys.argv[1])):\n"
                               " print('held', flush=True); time.sleep(60)", str(out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    assert train(task, out) == 2
    capsys.readouterr()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert train(task, out) == 0  # the OS dropped the dead run's lock


def test_full_disk_is_one_line_and_keeps_the_last_checkpoint(task, tmp_path, capsys):
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full to make writes fail with ENOSPC")
    out = tmp_path / "run"
    assert train(task, out) == 0
    ck = (out / "checkpoint.pt").read_bytes()
    (out / "summary.json").unlink()  # as if the run stopped before its last write
    (out / f"summary.json.{os.getpid()}.tmp").symlink_to("/dev/full")  # that write now meets a full device
    assert train(task, out, "--resume") == 2
    err = err_line(capsys)
    assert "No space left on device" in err and "last good checkpoint" in err and "--resume" in err
    assert (out / "checkpoint.pt").read_bytes() == ck and not (out / f"summary.json.{os.getpid()}.tmp").exists()


def test_nan_never_becomes_the_last_good_checkpoint(task, tmp_path, capsys):
    out = tmp_path / "nan"
    assert train(task, out, "--lr", "1e30", "--batch-size", "64", "--epochs", "2") == 2
    assert "last good checkpoint: none yet" in err_line(capsys)
    assert not (out / "checkpoint.pt").exists()


def test_failed_predict_keeps_the_old_csv(task, tmp_path, capsys):
    old = tmp_path / "preds.csv"
    old.write_text("path,class_1\nold,1\n")
    (task / "images" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert main(["predict", "--images", str(task / "images"), "--output", str(old)]) == 2
    assert "zz_broken.png" in err_line(capsys)
    assert old.read_text() == "path,class_1\nold,1\n" and not list(tmp_path.glob("*.tmp"))


# --- backbone fingerprint -------------------------------------------------------------------------
def test_adapter_on_other_weights_names_both_fingerprints(task, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(task, out) == 0
    adapter = str(out / "adapter.safetensors")
    torch.manual_seed(0)
    same = rlrr.create_backbone("vit_pico_patch4_32", weights=None, num_classes=10)
    rlrr.load_adapter(same, adapter)  # the weights it was trained on
    other = rlrr.create_backbone("vit_pico_patch4_32", weights=None, num_classes=10)
    with pytest.raises(rlrr.AdapterMismatchError, match="trained on backbone weights [0-9a-f]{32} but this model's are "
                                                        "[0-9a-f]{32}.*--ignore-fingerprint"):
        rlrr.load_adapter(other, adapter)
    rlrr.load_adapter(rlrr.create_backbone("vit_pico_patch4_32", weights=None, num_classes=10), adapter,
                      check_fingerprint=False)
    shipped = ["--model", "vit_pico_patch4_32", "--weights", "pretrained", "--adapter", adapter,
               "--data", f"vtab1k:{task}"]
    assert main(["eval", *shipped]) == 2
    assert "--ignore-fingerprint" in err_line(capsys)
    assert main(["eval", *shipped, "--ignore-fingerprint"]) == 0
    capsys.readouterr()
    assert main(["info", "--adapter", adapter]) == 0
    text = capsys.readouterr().out
    fp = rlrr.adapter.read_adapter(adapter)[1]["backbone_fingerprint"]
    assert fp in text and "rlrr" in text and "vit_pico_patch4_32" in text


def test_fingerprint_sees_one_changed_weight():
    torch.manual_seed(0)
    a = rlrr.create_backbone("vit_pico_patch4_32", weights=None, num_classes=10)
    fp = rlrr.backbones.fingerprint(a)
    with torch.no_grad():
        a.head.weight.add_(1.0)  # the classifier is the task's, not the backbone's
        assert rlrr.backbones.fingerprint(a) == fp
        a.blocks[3].mlp.fc1.weight[5, 7] += 1e-3
    assert rlrr.backbones.fingerprint(a) != fp


# --- text in other encodings, near-twin class names, test images listed for training (#27 items 7-9) ----
def test_text_files_that_are_not_utf8_are_one_line_naming_file_line_and_fix(task, tmp_path, capsys):
    lines = (task / "test.txt").read_text().splitlines()
    (task / "test.txt").write_bytes("\n".join([*lines[:2], "images/caf\u00e9.png 1"]).encode("latin-1"))
    assert train(task, tmp_path / "run") == 2
    err = err_line(capsys)
    assert f"{task / 'test.txt'}:3: not UTF-8 text (byte 0xe9)" in err and "iconv -f latin1 -t utf-8" in err
    csv_file = tmp_path / "list.csv"
    csv_file.write_bytes("path,label\nimages/a.png,ch\u00e8vre\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"list.csv:2: not UTF-8 text"):
        build_data(f"csv:{csv_file}", CFG)


def test_predict_on_file_names_that_are_not_utf8_writes_their_names(task, tmp_path, capsys):
    images = tmp_path / "imgs"
    images.mkdir()
    raw = os.fsencode(images) + b"/caf\xe9.png"  # a Latin-1 name, as old cameras and zip files make them
    with open(raw, "wb") as f:
        f.write((task / "images" / "0000.png").read_bytes())
    out = tmp_path / "preds.csv"
    assert main(["predict", "--images", str(images), "--weights", "none", "--output", str(out)]) == 0, \
        capsys.readouterr().err
    assert out.read_bytes().splitlines()[1].startswith(b"caf\xe9.png,")  # the file's own bytes: it can be found again


def test_class_names_differing_only_in_case_or_spaces_are_warned_and_kept_apart(tmp_path, caplog):
    root = tmp_path / "pets"
    for name in ("Cat", "cat ", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / name / f"{i}.png")
    splits = build_data(f"folder:{root}", CFG)
    assert splits.class_names == ["Cat", "cat ", "dog"]
    assert "classes 'Cat' and 'cat ' differ only in case or surrounding spaces" in caplog.text
    caplog.clear()
    for split in ("train", "val", "test"):  # split folders: said once, of train's folders, which name the classes
        for name in ("Cat", "cat ", "dog"):
            (tmp_path / "split" / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "split" / split / name / "0.png")
    build_data(f"folder:{tmp_path / 'split'}", CFG)
    assert caplog.text.count("differ only in case") == 1 and "split/train: classes" in caplog.text


def test_a_test_image_listed_in_a_train_split_is_warned(task, caplog):
    test_line = (task / "test.txt").read_text().splitlines()[0]
    with open(task / "train800.txt", "a") as f:  # in train800 only, not in train800val200
        f.write(test_line + "\n")
    build_data(f"vtab1k:{task}", CFG)
    assert "1 test image(s) are also in the training lists" in caplog.text
