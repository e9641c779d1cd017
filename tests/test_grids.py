"""Grids of runs: the paper's ablation studies, the per-task sweep, and the launchers that run cells
elsewhere (local processes, submitit's local executor standing in for Slurm)."""
import json
import sys

import pytest
from fixtures import make_vtab

from rlrr.grid.bench import run_bench
from rlrr.cli import main
from rlrr.engine.experiment import plan
from rlrr.grid.launch import Launcher
from rlrr.grid.study import STUDIES, study_rows

MODEL = "vit_pico_patch4_32"


def test_study_rows_are_the_papers_variants():
    assert [r.label for r in study_rows("scalings")] == ["left", "right", "both", "left + W", "right + W",
                                                         "both + W (RLRR)"]
    rows = study_rows("sites", 6)
    assert [r.options.get("blocks") for r in rows[4:]] == [f"first:{k}" for k in range(1, 6)]
    for name in STUDIES:  # every row is a valid method configuration; the defaults share one cell folder
        for row in study_rows(name, 3):
            plan("offline:mnist", row.method, row.options)
        assert any(r.folder == "rlrr" for r in study_rows(name, 3))


def test_scalings_study_smoke_prints_table_6_and_shares_the_rlrr_cell(tmp_path, capsys):
    out = tmp_path / "study"
    quick = ["--suite", "offline:digits", "--epochs", "1", "--seeds", "0"]  # digits: a small test split
    assert main(["bench", "--study", "scalings", *quick, "--output", str(out)]) == 0
    text = capsys.readouterr().out
    for label in ("| left |", "| right + W |", "| both + W (RLRR) |"):
        assert label in text
    assert "Table 6" in text and "| 89.3 | 84.7 | 99.5 | 92.0 | 87.0 | 90.4 | 0.47 |" in text  # the published row
    assert "Agreement with the paper's row order for the scalings study over 6 rows: Spearman ρ" in text
    assert json.loads((out / "study_scalings_agreement.json").read_text())["n"] == 6
    md = (out / "study_scalings.md").read_text()
    assert md.count("| 0.0") >= 6 and (out / "study_scalings.png").stat().st_size > 1000
    rlrr_cell = out / "digits" / "rlrr" / "seed0" / "summary.json"
    stamp = rlrr_cell.stat().st_mtime_ns
    assert main(["bench", "--study", "additive", *quick, "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "digits w/ W (RLRR) seed 0: done" in text and "Supp. Table 11" in text and "| LoRA r=16 |" in text
    assert rlrr_cell.stat().st_mtime_ns == stamp
    assert json.loads((out / "digits" / "rlrr_form-additive" / "seed0" / "summary.json").read_text())[
        "method_config"]["form"] == "additive"


def sweep_args(out, *extra):
    return ["sweep", "--model", MODEL, "--weights", "pretrained", "--data", "offline:mnist", "--method", "rlrr",
            "--grid", "lr=1e-3,1e-2", "--epochs", "2", "--output", str(out), "--no-progress", *extra]


def test_sweep_chooses_on_val_writes_a_task_yaml_and_resumes(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(sweep_args(out)) == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["trials"] == {"complete": 2, "pruned": 0, "fail": 0, "cut off": 0}
    trials = (out / "trials.csv").read_text().splitlines()
    assert len(trials) == 3 and trials[0].startswith("trial,lr,state,val_acc")
    vals = {float(line.split(",")[1]): float(line.split(",")[3]) for line in trials[1:]}
    assert summary["best"]["lr"] == max(vals, key=vals.get) and summary["val_acc"] == max(vals.values())
    for folder in (out / "trials").iterdir():  # trials never test
        assert json.loads((folder / "summary.json").read_text())["test_acc"] is None
    final = json.loads(next((out / "final").glob("*/summary.json")).read_text())
    assert summary["final"] == {k: final[k] for k in ("protocol", "selected_epoch", "val_acc", "test_acc")}
    assert final["protocol"] == "retrain" and final["config"]["lr"] == summary["best"]["lr"]
    _, train, _ = plan("offline:mnist", "rlrr", None, str(out / "best.yaml"))  # rlrr train --config takes it
    assert (train.lr, train.epochs) == (summary["best"]["lr"], 2)
    assert (out / "sweep.png").stat().st_size > 1000
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")}
    capsys.readouterr()
    assert main(sweep_args(out)) == 0  # a second call reads everything back
    assert {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")} == stamps
    assert "running" not in capsys.readouterr().out
    (out / "optuna.journal").unlink()  # the journal lost (a kill before a finished trial was told): the trials'
    assert main(sweep_args(out)) == 0   # finished runs are read back, not retrained, and choose the same
    assert json.loads((out / "sweep.json").read_text())["best"] == summary["best"]
    assert "% val" in capsys.readouterr().out and {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")} == stamps
    assert main(sweep_args(out, "--weight-decay", "0.01")) == 2  # another sweep into the same folder: refused
    assert "holds a sweep run with train=" in capsys.readouterr().err


def test_pruned_trials_stop_early_and_a_sweep_without_a_finished_trial_says_so(tmp_path):
    import optuna
    from rlrr.grid.sweep import Sweep, parse_grid
    out = tmp_path / "sweep"
    sweep = Sweep(out, MODEL, "pretrained", "offline:mnist", "rlrr", {}, parse_grid(["lr=0.01"]), epochs=3,
                  pruner=optuna.pruners.ThresholdPruner(lower=101.0))  # every val accuracy is below 101%
    with pytest.raises(RuntimeError, match="no trial of the sweep .* finished"):
        sweep.run()
    trial = sweep.study().trials[0]
    assert trial.state.name == "PRUNED" and list(trial.intermediate_values) == [1]  # stopped after one epoch
    assert not (out / "trials" / "lr-0.01" / "summary.json").exists()
    assert ",pruned," in (out / "trials.csv").read_text()


def test_the_sweep_never_reads_the_test_split_before_its_choice(tmp_path):
    root = tmp_path / "vtab"
    task = make_vtab(root, "svhn", sizes=(40, 10, 30))
    test_files = {str(task / line.split()[0]) for line in (task / "test.txt").read_text().split("\n") if line}
    events = []

    def hook(event, args):
        if event == "open" and isinstance(args[0], str) and args[0] in test_files:
            events.append("test")
        elif event == "os.rename" and str(args[1]).endswith("best.yaml"):
            events.append("choice")
    sys.addaudithook(hook)  # the interpreter's own record of every file it opens
    out = tmp_path / "sweep"
    assert main(["sweep", "--model", MODEL, "--data", f"vtab1k:{task}", "--grid", "lr=0.01,0.1", "--epochs", "1",
                 "--batch-size", "16", "--output", str(out), "--no-progress"]) == 0
    assert "choice" in events and "test" in events
    assert "test" not in events[:events.index("choice")]
    test_files.clear()  # the hook stays installed for the session: make it inert


def test_bench_tune_chooses_each_rows_rate_on_val_and_says_which(tmp_path, capsys):
    out = tmp_path / "tuned"
    suite = ["--suite", "offline:digits", "--epochs", "1"]  # digits: a small test split, a quick test
    assert main(["bench", *suite, "--seeds", "0", "--methods", "rlrr", "--tune", "lr=x0.5,x2", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    tune = out / "digits" / "rlrr_tuned" / "tune"
    trials = {}
    for folder in (tune / "trials").iterdir():  # the rates are multiples of RLRR's 0.06 in the digits config
        res = json.loads((folder / "summary.json").read_text())
        assert res["protocol"] == "search" and res["test_acc"] is None  # trials never test
        trials[res["config"]["lr"]] = res["val_acc"]
    assert sorted(trials) == [0.03, 0.12]
    chosen = max(trials, key=trials.get)
    cell = json.loads((out / "digits" / "rlrr_tuned" / "seed0" / "summary.json").read_text())
    assert cell["config"]["lr"] == chosen and cell["protocol"] == "val" and cell["test_acc"] is not None
    assert f"| rlrr | {chosen:g} |" in text  # the table says which rate the row got
    import csv
    import shlex
    row = next(csv.DictReader(open(out / "results.csv", encoding="utf-8")))  # results as data: rerun one cell
    assert row["code"] and float(row["lr"]) == chosen
    args = shlex.split(row["command"])
    args[args.index("--output") + 1] = str(tmp_path / "recheck")
    assert args[:2] == ["rlrr", "train"] and main(args[1:] + ["--no-progress"]) == 0
    assert json.loads((tmp_path / "recheck" / "summary.json").read_text())["test_acc"] == cell["test_acc"]
    assert main(["bench", *suite, "--methods", "rlrr", "--tune", "lr=x0.5,0.1", "--output", str(out)]) == 2
    assert "every value of lr as a multiple" in capsys.readouterr().err


def test_tuning_over_two_seeds_scores_each_rate_by_its_mean_val(tmp_path, capsys, monkeypatch):
    """--tune-seeds 2: every trial runs at seeds 0 and 1 and the rate with the best mean val wins (a rate
    that diverges at one seed loses), then the cells of every seed run with that one rate."""
    import csv
    out = tmp_path / "tuned2"
    suite = ["--suite", "offline:digits", "--epochs", "1", "--methods", "rlrr", "--tune", "lr=x0.5,x2"]
    assert main(["bench", *suite, "--seeds", "0,1", "--tune-seeds", "2", "--output", str(out)]) == 0
    tune = out / "digits" / "rlrr_tuned" / "tune"
    mean = {}
    for folder in (tune / "trials").iterdir():
        runs = [json.loads((folder / f"seed{s}" / "summary.json").read_text()) for s in (0, 1)]
        assert [r["settings"]["seed"] for r in runs] == [0, 1] and all(r["test_acc"] is None for r in runs)
        assert runs[0]["val_acc"] != runs[1]["val_acc"]  # two seeds, two runs
        mean[runs[0]["config"]["lr"]] = (runs[0]["val_acc"] + runs[1]["val_acc"]) / 2
    trials = {float(r["lr"]): r for r in csv.DictReader(open(tune / "trials.csv", encoding="utf-8"))}
    for lr, m in mean.items():  # trials.csv shows each seed's val and scores the trial by their mean
        assert float(trials[lr]["val_acc"]) == pytest.approx(m, abs=0.01) and len(trials[lr]["val_by_seed"].split()) == 2
    chosen = max(mean, key=mean.get)
    for seed in (0, 1):
        cell = json.loads((out / "digits" / "rlrr_tuned" / f"seed{seed}" / "summary.json").read_text())
        assert cell["config"]["lr"] == chosen and cell["test_acc"] is not None
    import rlrr.grid.bench
    launched = []  # run again with workers: a finished bench is read back, no sweep or cell is handed to them
    real = rlrr.grid.bench.launch
    monkeypatch.setattr(rlrr.grid.bench, "launch", lambda calls, *a: launched.extend(calls) or real(calls, *a))
    assert main(["bench", *suite, "--seeds", "0,1", "--tune-seeds", "2", "--workers", "2", "--output", str(out)]) == 0
    assert launched == []
    capsys.readouterr()
    assert main(["bench", *suite, "--seeds", "0", "--tune-seeds", "2", "--output", str(out)]) == 2
    assert "--tune-seeds 2 tunes on the first 2 of --seeds, which has 1" in capsys.readouterr().err
    assert main(["bench", "--suite", "offline:digits", "--seeds", "0,1", "--tune-seeds", "2", "--output", str(out)]) == 2
    assert "add --tune" in capsys.readouterr().err


def test_the_proxy_suite_tunes_every_rate_on_its_small_tasks(tmp_path, capsys):
    out = tmp_path / "proxy"
    assert main(["bench", "--suite", "proxy", "--smoke", "--methods", "linear", "--output", str(out)]) == 0
    trials = sorted(p.name for p in (out / "mnist@100" / "linear_tuned" / "tune" / "trials").iterdir())
    assert trials == ["lr-0.01", "lr-0.033", "lr-0.1", "lr-0.3"]  # x0.1, x0.33, x1, x3 around linear's own 0.1
    cell = json.loads((out / "mnist@100" / "linear_tuned" / "seed0" / "summary.json").read_text())
    assert cell["settings"]["data"] == "offline:mnist:100" and cell["protocol"] == "val"
    assert cell["settings"]["weights"] == "pretrained:fractal1k"  # the backbone pre-trained at FractalDB-1k scale
    from rlrr.backbones import EMBEDDED_NAME, create_backbone, fingerprint
    assert cell["settings"]["backbone_fingerprint"] != fingerprint(create_backbone(EMBEDDED_NAME, "pretrained"))
    text = capsys.readouterr().out
    assert "| method | mnist@100 |" in text and f"| linear | {cell['config']['lr']:g} |" in text
    # a finished cell is not read back as if other weights had made it: one line naming the fix
    import shutil
    shutil.rmtree(out / "mnist@100" / "linear_tuned" / "tune")
    assert main(["bench", "--suite", "proxy", "--smoke", "--methods", "linear", "--weights", "pretrained",
                 "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "weights='pretrained:fractal1k' (now 'pretrained')" in err and "delete that folder" in err


def cell_acc(out, method: str) -> float:
    return json.loads((out / "mnist" / method / "seed0" / "summary.json").read_text())["test_acc"]


def test_bench_cells_run_through_submitit_and_come_back_as_one_table(tmp_path):
    pytest.importorskip("submitit")
    out = tmp_path / "bench"
    rows = run_bench("mini", ["linear", "bitfit"], [0], out, smoke=True,
                     launcher=Launcher("slurm", cpus=1, time_min=10, cluster="local"))
    assert [r["method"] for r in rows] == ["linear", "bitfit"]
    assert all(r["test_acc"] == cell_acc(out, r["method"]) for r in rows)  # read back from the jobs' cell folders
    assert any((out / "logs").glob("*_log.out"))  # submitit's job logs: the cells ran as its jobs
    md = (out / "results.md").read_text()
    assert "| linear |" in md and "| bitfit |" in md


def test_local_workers_run_cells_in_processes_and_name_failures(tmp_path):
    out = tmp_path / "bench"
    rows = run_bench("mini", ["linear"], [0], out, smoke=True, launcher=Launcher("local", workers=2))
    assert rows[0]["test_acc"] == cell_acc(out, "linear")
    with pytest.raises(RuntimeError, match=r"1 of 1 cells failed \(first: \[2/2\] mnist lora seed 0: ValueError"):
        run_bench("mini", ["linear", "lora"], [0], out, smoke=True, launcher=Launcher("local", workers=2),
                  epochs=0)
