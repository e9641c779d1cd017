"""``rlrr sweep``: the paper's per-task hyper-parameter search (Supp. Table 3), done honestly.

Trials train on ``train`` and are scored on ``val`` only (protocol ``search``: the test split is never
read); Optuna draws the grid points (``GridSampler``, in a seeded random order, so ``--budget`` is a
random subset of the grid) and stops hopeless trials on their validation curve (``MedianPruner``).  The
best trial's setting is written as ``best.yaml`` (a task YAML ``rlrr train --config`` takes), then
retrained with the ``retrain`` protocol (pick the epoch on val, train on train+val, test once) in
``final/<setting>/``: the only run that reads test.

Everything resumes: trials live in an Optuna journal (``optuna.journal``), each trial's run in
``trials/<setting>/`` (a bench cell: resumed from its checkpoint).  A trial cut off by a kill stays
"running" in the journal; the grid sampler asks its setting again once every other one has started,
and that trial resumes the same folder.  A finished sweep is only read back.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import fields
from pathlib import Path
from typing import Any

from .bench import RUN_OPTIONS, run_cell
from .config import load_yaml, task_config, task_config_path
from .engine.trainer import TrainConfig
from .experiment import plan
from .files import atomic_write, write_csv
from .launch import Launcher, launch

# Supp. Table 3: lr, weight decay, dropout (drop path here), batch size.
PAPER_GRID: dict[str, list] = {"lr": [0.2, 0.1, 0.05, 0.01, 0.005, 0.001, 0.0001],
                               "weight_decay": [0.05, 0.01, 0.005, 0.001, 0.0],
                               "drop_path": [0.0, 0.1, 0.3, 0.5, 0.7], "batch_size": [256, 128, 32]}
NOT_SEARCHED = {"protocol", "seed", "device", "progress", "num_workers", "eval_batch_size", "deterministic"}
TASK_KEYS = ("drop_path", "aug", "num_classes")  # run options a task YAML holds itself
SEARCHABLE = tuple(f.name for f in fields(TrainConfig) if f.name not in NOT_SEARCHED) + ("drop_path",)


def _optuna():
    try:
        import optuna
    except ImportError:
        raise RuntimeError("rlrr sweep needs Optuna; pip install 'rlrr[sweep]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def parse_grid(items: list[str] | None) -> dict[str, list]:
    """``KEY=V1,V2,...`` flags as a grid (values as YAML scalars); none: the paper's whole grid."""
    if not items:
        return copy.deepcopy(PAPER_GRID)
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in SEARCHABLE:
            raise ValueError(f"--grid {item!r} must be KEY=V1,V2,... with KEY one of {', '.join(SEARCHABLE)}")
        parsed = [load_yaml(v, f"--grid {item}", lines=False) for v in values.split(",") if v.strip()]
        hint = float if key == "drop_path" else next(f.type for f in fields(TrainConfig) if f.name == key)
        want = (int, float) if "float" in str(hint) else (int,) if "int" in str(hint) else (object,)
        bad = [v for v in parsed if isinstance(v, bool) or not isinstance(v, want)]
        if not parsed or bad:
            raise ValueError(f"--grid {item!r}: give one or more {'numbers' if float in want else 'values'} "
                             f"separated by commas{f', not {bad[0]!r}' if bad else ''}")
        grid[key] = list(dict.fromkeys(parsed))
    return grid


def setting_folder(params: dict) -> str:
    """A trial's folder name: its setting, so a trial asked again (a resumed kill) finds its own run."""
    return "_".join(f"{k}-{params[k]:g}" if isinstance(params[k], float) else f"{k}-{params[k]}" for k in sorted(params))


class Sweep:
    """One sweep's settings and folder; ``run()`` does it all, ``work()`` is one worker's share of the trials."""

    def __init__(self, out: Path, model: str, weights: str | None, data: str, method: str, method_opts: dict,
                 grid: dict[str, list], budget: int | None = None, config: str | None = None, pruner: Any = None,
                 **train: Any):
        clash = sorted(set(grid) & {k for k, v in train.items() if v is not None})
        if clash:
            raise ValueError(f"--{clash[0].replace('_', '-')} is fixed and searched by --grid; drop one of the two")
        self.out, self.grid, self.config, self.pruner = Path(out), grid, config, pruner  # None: MedianPruner
        self.run_args = dict(model=model, weights=weights or "pretrained", spec=data, method=method,
                             method_opts=method_opts or None)
        train = {k: v for k, v in train.items() if v is not None and k != "progress"}  # cells run quietly
        self.run_opts = {k: train.pop(k) for k in RUN_OPTIONS if k in train and k not in grid}
        self.train = train
        size = math.prod(len(v) for v in grid.values())
        self.trials = min(budget, size) if budget else size
        self.epochs = plan(data, method, method_opts, config, **self.train)[1].epochs  # validates everything now
        # what makes two sweeps the same one (the budget may grow on a later call: more trials of the same search)
        self.record = json.loads(json.dumps({"grid": grid, **self.run_args, "config": config, "train": self.train,
                                             "run": self.run_opts}))

    def study(self):
        optuna = _optuna()
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend
        self.out.mkdir(parents=True, exist_ok=True)
        storage = JournalStorage(JournalFileBackend(str(self.out / "optuna.journal")))
        study = optuna.create_study(study_name="sweep", storage=storage, load_if_exists=True, direction="maximize",
                                    sampler=optuna.samplers.GridSampler(self.grid, seed=0),
                                    pruner=self.pruner or optuna.pruners.MedianPruner(
                                        n_startup_trials=3, n_warmup_steps=max(1, self.epochs // 3)))
        return study

    def objective(self, trial) -> float:
        optuna = _optuna()
        params = {k: trial.suggest_categorical(k, v) for k, v in self.grid.items()}
        folder = self.out / "trials" / setting_folder(params)
        trial.set_user_attr("folder", str(folder.relative_to(self.out)))

        def report(row: dict) -> None:
            trial.report(row["val_acc"], row["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"val {row['val_acc']:.1f}% at epoch {row['epoch']}, below the median")
        res = run_cell(folder, f"trial {trial.number} {params}", **self.run_args, on_epoch=report,
                       **{**self.train, **self.run_opts, "protocol": "search", "config": self.config}, **params)
        trial.set_user_attr("selected_epoch", res["selected_epoch"])
        return res["val_acc"]

    def work(self) -> None:
        """Run trials until the sweep has ``self.trials`` finished ones (several workers may share it)."""
        optuna = _optuna()
        from optuna.trial import TrialState
        from .engine.trainer import TrainingStopped
        study = self.study()
        done = (TrialState.COMPLETE, TrialState.PRUNED)  # a failed trial does not use up the budget
        if len(study.get_trials(deepcopy=False, states=done)) < self.trials:  # the grid's end stops it too
            study.optimize(self.objective, catch=(TrainingStopped,),
                           callbacks=[optuna.study.MaxTrialsCallback(self.trials, states=done)])

    def run(self, launcher: Launcher | None = None) -> dict:
        """All trials (here or where ``launcher`` says), the choice on val, ``best.yaml``, then the final run."""
        _optuna()
        from optuna.trial import TrialState
        launcher = launcher or Launcher()
        study = self.study()
        was = study.user_attrs.get("record")
        if was is None:
            study.set_user_attr("record", self.record)
        elif was != self.record:
            diff = ", ".join(f"{k}={was.get(k)!r} (now {v!r})" for k, v in self.record.items() if was.get(k) != v)
            raise ValueError(f"{self.out} holds a sweep run with {diff}; pass another --output or delete it")
        if launcher.kind == "local" and launcher.workers == 1:
            self.work()
        else:  # workers share the journal: each asks Optuna for the next setting until the budget is met
            launch([(f"sweep worker {i}", _work, {"sweep": self}) for i in range(launcher.workers)], launcher,
                   self.out / "logs")
        trials = self.study().trials
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        best = max(complete, key=lambda t: (t.value, -t.number)) if complete else None
        self.write_trials(trials, best.number if best else -1)
        if best is None:
            raise RuntimeError(f"no trial of the sweep in {self.out} finished (see trials.csv); widen the grid or "
                               "lower the learning rates")
        best_yaml = self.write_best(best.params)
        final = run_cell(self.out / "final" / setting_folder(best.params), f"final run of {best.params}", **self.run_args,
                         **{**self.train, **self.run_opts, "protocol": "retrain", "config": str(best_yaml)})
        summary = {"best": best.params, "best_trial": best.number, "val_acc": best.value,
                   "trials": {s.name.lower(): sum(t.state == s for t in trials) for s in
                              (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)},
                   "final": {k: final[k] for k in ("protocol", "selected_epoch", "val_acc", "test_acc")},
                   "best_yaml": str(best_yaml)}
        atomic_write(self.out / "sweep.json", lambda f: f.write(json.dumps(summary, indent=1)), "w")
        print(f"best on val: {best.params} ({best.value:.2f}% val, trial {best.number}); retrained on train+val: "
              f"test top-1 {final['test_acc']:.2f}% -> {best_yaml}")
        return summary

    def write_best(self, params: dict) -> Path:
        """The task YAML of the chosen setting: the task's own config with the setting (and the sweep's fixed
        training values) written in, the method's rate override dropped (it would beat ``train.lr``)."""
        task = copy.deepcopy(task_config(self.run_args["spec"], self.config))
        chosen = {**{k: v for k, v in self.run_opts.items() if k in TASK_KEYS}, **params}
        task.update({k: chosen.pop(k) for k in TASK_KEYS if k in chosen})
        task["train"] = {**(task.get("train") or {}), **self.train, **chosen}
        if "lr" in chosen:
            (task.get("method_lr") or {}).pop(self.run_args["method"], None)
        task["sweep"] = {"searched": self.grid, "chosen_on": "val",
                         "from": str(task_config_path(self.run_args["spec"], self.config)),
                         "flags": {k: v for k, v in self.run_opts.items() if k not in TASK_KEYS}}  # pass these again
        import yaml
        path = self.out / "best.yaml"
        atomic_write(path, lambda f: f.write(yaml.safe_dump(task, sort_keys=False)), "w")
        return path

    def write_trials(self, trials, best: int) -> None:
        """trials.csv / trials.md (every trial: setting, state, val, epochs run) and sweep.png (val over the grid)."""
        rows = [{"trial": t.number, **t.params, "state": t.state.name.lower(),
                 "val_acc": None if t.value is None else round(t.value, 2),
                 "epochs_run": max(t.intermediate_values, default=None), "best": t.number == best} for t in trials]
        write_csv(self.out / "trials.csv", rows)
        keys = list(rows[0])
        md = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        md += ["| " + " | ".join("" if r.get(k) is None else str(r[k]) for k in keys) + " |" for r in rows]
        atomic_write(self.out / "trials.md", lambda f: f.write("\n".join(md) + "\n"), "w")
        self.plot(trials, best)

    def plot(self, trials, best: int) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        keys = list(self.grid)
        fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3), squeeze=False)
        for ax, key in zip(axes[0], keys):
            for t in trials:
                val = t.value if t.value is not None else max(t.intermediate_values.values(), default=float("nan"))
                style = dict(color="C3", s=50) if t.number == best else \
                    dict(color="C0" if t.value is not None else "0.6", s=20)
                ax.scatter(t.params[key], val, **style)
            if all(isinstance(v, (int, float)) and v > 0 for v in self.grid[key]) and \
                    max(self.grid[key]) / min(self.grid[key]) >= 10:
                ax.set_xscale("log")
            ax.set(xlabel=key, ylabel="val top-1 (%)")
            ax.grid(alpha=0.3)
        fig.suptitle("sweep: val accuracy per trial (red: chosen; grey: pruned, last val)", fontsize=9)
        fig.tight_layout()
        fig.savefig(self.out / "sweep.png", dpi=90)
        plt.close(fig)


def _work(sweep: Sweep) -> None:
    sweep.work()
