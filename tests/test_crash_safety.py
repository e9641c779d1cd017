"""Long jobs killed with kill -9 at bad moments: rerunning the same command reaches the uninterrupted
result; locks of dead processes are known by the holder being gone; launchers never pretend."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlrr.cli import main
from rlrr.files import FileLock, lock_held

GRID = ["--model", "vit_pico_patch4_32", "--data", "offline:mnist", "--grid", "lr=0.003,0.01,0.03", "--budget", "2",
        "--epochs", "2", "--batch-size", "64", "--no-progress"]


def err_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def outcome(out: Path) -> dict:
    """What a sweep decided: its summary, and every finished trial's setting, state and val accuracy."""
    summary = json.loads((out / "sweep.json").read_text())
    summary.pop("best_yaml")
    summary.pop("best_trial")  # a trial number: a cut-off trial takes one
    summary["trials"].pop("cut off")
    rows = [line.split(",") for line in (out / "trials.csv").read_text().splitlines()[1:]]
    return {"summary": summary, "trials": sorted((r[1], r[2], r[3]) for r in rows if r[2] != "cut off")}


def killed_when(cmd: list[str], cwd: Path, appears: Path, timeout: float = 240) -> None:
    """Run ``cmd`` and kill -9 it as soon as ``appears`` exists (the bad moment)."""
    proc = subprocess.Popen([sys.executable, "-m", "rlrr.cli", *cmd], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    end = time.monotonic() + timeout
    while not appears.exists() and proc.poll() is None and time.monotonic() < end:
        time.sleep(0.02)
    assert proc.poll() is None, f"{cmd} ended before {appears} appeared"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ref") / "sweep"
    assert main(["sweep", *GRID, "--output", str(out)]) == 0
    return outcome(out)


def test_a_sweep_killed_mid_trial_and_between_trials_resumes_to_the_same_choice(uninterrupted, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sweep"
    first = out / "trials" / "lr-0.003"  # the first setting in grid order
    killed_when(["sweep", *GRID, "--output", "sweep"], tmp_path, first / "checkpoint.pt")  # relative, after epoch 1
    assert not (out / "sweep.json").exists()
    killed_when(["sweep", *GRID, "--output", str(out)], tmp_path, out / "trials" / "lr-0.03")  # absolute, next trial
    # as if a kill had also hit inside a journal write: a torn record without its newline
    with open(out / "optuna.journal", "ab") as f:
        f.write(b'{"op_code": 6, "worker_id": "x", "trial_id": 0, "par')
    assert main(["sweep", *GRID, "--output", "sweep"]) == 0
    assert outcome(out) == uninterrupted
    assert json.loads((out / "sweep.json").read_text())["trials"]["cut off"] >= 1


def test_a_damaged_journal_is_one_line_naming_the_file_and_the_fix(tmp_path, capsys):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "optuna.journal").write_text('{"op_code": 0, "worker_id": "a", "study_name": "sweep"}\n{"op_c!!\n{}\n')
    assert main(["sweep", *GRID, "--output", str(out)]) == 2
    err = err_line(capsys)
    assert str(out / "optuna.journal") in err and "damaged" in err and f"delete {out}" in err


def test_bad_grid_values_are_refused_before_any_trial_and_a_corrected_rerun_works(tmp_path, capsys):
    out = tmp_path / "sweep"
    bad = ["sweep", "--model", "vit_pico_patch4_32", "--data", "offline:mnist", "--epochs", "1", "--output", str(out)]
    assert main([*bad, "--grid", "lr=-0.1"]) == 2
    assert "--grid 'lr=-0.1': --lr must be a positive number, not -0.1" in err_line(capsys)
    assert not out.exists()  # nothing recorded, so the corrected command is not refused
    assert main([*bad, "--grid", "drop_path=0.1,1.5"]) == 2
    assert "drop_path must be in [0, 1), not 1.5" in err_line(capsys)
    assert main([*bad, "--grid", "lr=0.01", "--grid", "lr=0.001"]) == 2
    assert "--grid lr is given twice" in err_line(capsys)


def test_a_failing_trial_is_one_line_and_does_not_use_up_the_budget(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "--model", "vit_pico_patch4_32", "--data", "offline:mnist", "--grid", "lr=1e30,0.01",
                 "--budget", "1", "--epochs", "1", "--batch-size", "64", "--output", str(out), "--no-progress"]) == 0
    text = capsys.readouterr()
    assert "Traceback" not in text.out + text.err
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["best"] == {"lr": 0.01} and summary["trials"]["fail"] == 1 and summary["trials"]["complete"] == 1


def test_slurm_where_there_is_none_is_one_line_and_runs_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun on it
    out = tmp_path / "bench"
    assert main(["bench", "--suite", "mini", "--methods", "linear", "--smoke", "--launcher", "slurm",
                 "--output", str(out)]) == 2
    err = err_line(capsys)
    assert "no Slurm here" in err and "--launcher local" in err
    assert not list(out.glob("*/*/seed0/summary.json"))


def test_a_lock_of_a_killed_process_is_free_at_once(tmp_path):
    path = tmp_path / "x.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom rlrr.files import FileLock\n"
                               "lock = FileLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(60)",
                               str(path)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    assert lock_held(path) and not FileLock(path, blocking=False).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    start = time.monotonic()
    lock = FileLock(path)
    assert lock.acquire() and time.monotonic() - start < 1 and lock_held(path)
    assert lock.acquire() and lock.depth == 2  # re-entrant in its holder
    lock.release(), lock.release()
    assert path.read_text() == str(os.getpid()) and not lock_held(path)


def results(out: Path) -> list[dict]:
    """A bench's table rows without the wall-clock column (the one thing a rerun may change)."""
    import csv
    rows = list(csv.DictReader(open(out / "results.csv")))
    return [{k: v for k, v in r.items() if "wall" not in k} for r in rows]


def test_a_bench_killed_mid_cell_resumes_to_the_uninterrupted_table(tmp_path):
    bench = ["bench", "--suite", "mini", "--smoke", "--methods", "linear", "--epochs", "2"]
    ref = tmp_path / "ref"
    assert main([*bench, "--output", str(ref)]) == 0
    out = tmp_path / "killed"
    killed_when([*bench, "--output", "killed"], tmp_path, out / "mnist" / "linear" / "seed0" / "checkpoint.pt")
    assert not (out / "results.csv").exists()
    assert main([*bench, "--output", str(out)]) == 0
    assert results(out) == results(ref)


def test_a_pretraining_killed_after_any_epoch_continues_to_the_same_weights(tmp_path, capsys):
    args = ["pretrain", "--classes", "4", "--per-class", "40", "--epochs", "4", "--batch-size", "16",
            "--warmup-epochs", "1"]
    assert main([*args, "--output", str(tmp_path / "ref")]) == 0
    ref = (tmp_path / "ref" / "vit_pico_patch4_32.fractal.safetensors").read_bytes()
    out = tmp_path / "killed"
    ckpt = out / "vit_pico_patch4_32.fractal.checkpoint.pt"
    killed_when([*args, "--output", "killed"], tmp_path, ckpt)  # after its first epoch
    assert not (out / "vit_pico_patch4_32.fractal.safetensors").exists()
    capsys.readouterr()
    assert main([*args, "--output", str(out)]) == 0
    assert "continuing the pre-training" in capsys.readouterr().out
    assert (out / "vit_pico_patch4_32.fractal.safetensors").read_bytes() == ref
    assert main([*args, "--output", str(out)]) == 0 and "is finished" in capsys.readouterr().out
    assert main([*args[:-1], "2", "--output", str(out)]) == 2  # other settings: refused, named
    assert "warmup_epochs=1 (now 2)" in err_line(capsys)


def test_a_missing_extra_is_one_line_naming_the_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optuna", None)  # None in sys.modules: Python's own "cannot import"
    assert main(["sweep", *GRID, "--output", "unused"]) == 2
    assert err_line(capsys) == "error: rlrr sweep needs the sweep extra (optuna is not installed); pip install 'rlrr[sweep]'"


def test_two_processes_writing_one_file_at_once_both_succeed(tmp_path):
    """As two `rlrr merge --output cm.safetensors` at once: each writer renames a whole file of its own."""
    target = tmp_path / "cm.safetensors"
    code = ("import sys\nfrom rlrr.files import atomic_write\nfor _ in range(300):\n"
            "    atomic_write(sys.argv[1], lambda f: f.write(sys.argv[2].encode() * 4096))")
    writers = [subprocess.Popen([sys.executable, "-c", code, str(target), tag], stderr=subprocess.PIPE, text=True)
               for tag in ("a", "b")]
    errors = [w.communicate(timeout=120)[1] for w in writers]
    assert [w.returncode for w in writers] == [0, 0], errors
    assert target.read_bytes() in (b"a" * 4096, b"b" * 4096) and not list(tmp_path.glob("*.tmp"))
