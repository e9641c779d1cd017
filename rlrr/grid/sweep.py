"""``rlrr sweep``: the paper's per-task hyper-parameter search (Supp. Table 3), done honestly.

Trials train on ``train`` and are scored on ``val`` only (protocol ``search``: the test split is never
read); Optuna draws the grid points (``GridSampler``, in a seeded random order, so ``--budget`` is a
random subset of the grid) and stops hopeless trials on their validation curve (``MedianPruner``).  The
best trial's setting is written as ``best.yaml`` (a task YAML ``rlrr train --config`` takes), then
retrained with the ``retrain`` protocol (pick the epoch on val, train on train+val, test once) in
``final/<setting>/``: the only run that reads test.  With ``seeds`` every trial runs at each of them
(``trials/<setting>/seed<k>/``) and is scored by their mean val, so a setting that diverges at one seed loses.

Everything resumes, and a kill -9 at any point changes nothing: the grid is visited in one seeded order
(``--budget`` is its first settings), trials live in an Optuna journal (``optuna.journal``) written under
an ``flock`` the kernel drops with a dead writer (a record torn by a kill mid-write is cut off on the next
open), and each trial's run in ``trials/<setting>/`` (a bench cell: resumed from its checkpoint).  Each
worker holds a lock of its own while it lives, so a trial left "running" by a dead worker is known for
what it is: marked failed (cut off) and its setting run again, resuming its folder, before any other.
So a killed sweep, rerun, reaches the uninterrupted one's trials and choice.  A finished sweep is only
read back.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import socket
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..config import load_yaml, task_config, task_config_path
from ..engine.experiment import plan
from ..engine.trainer import TrainConfig
from ..extras import need
from ..files import FileLock, atomic_write, figure, lock_held, markdown_table, save_figure, write_csv
from .cells import RUN_OPTIONS, run_cell
from .launch import Launcher, launch

# Supp. Table 3: lr, weight decay, dropout (drop path here), batch size.
PAPER_GRID: dict[str, list] = {"lr": [0.2, 0.1, 0.05, 0.01, 0.005, 0.001, 0.0001],
                               "weight_decay": [0.05, 0.01, 0.005, 0.001, 0.0],
                               "drop_path": [0.0, 0.1, 0.3, 0.5, 0.7], "batch_size": [256, 128, 32]}
NOT_SEARCHED = {"protocol", "seed", "device", "progress", "num_workers", "eval_batch_size", "deterministic",
                "grad_checkpointing", "compile", "log", "log_group"}
TASK_KEYS = ("drop_path", "aug", "num_classes")  # run options a task YAML holds itself
SEARCHABLE = tuple(f.name for f in fields(TrainConfig) if f.name not in NOT_SEARCHED) + ("drop_path",)
OWNERS: dict[str, FileLock] = {}  # this process's owner lock per sweep worker name, held until it exits


def _optuna():
    optuna = need("sweep", "rlrr sweep", "optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def parse_grid(items: list[str] | None, flag: str = "--grid", relative: bool = False) -> dict[str, list]:
    """``KEY=V1,V2,...`` flags as a grid (values as YAML scalars), every value checked now, before any trial
    or journal exists; none: the paper's whole grid.  ``relative`` (``--tune``) also takes ``xF`` for F times
    the run's own value of KEY (each method's rate from its task config: ``lr=x0.33,x1,x3``), kept as the
    string until ``resolve_grid`` knows the run."""
    if not items:
        return copy.deepcopy(PAPER_GRID)
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in SEARCHABLE:
            raise ValueError(f"{flag} {item!r} must be KEY=V1,V2,... with KEY one of {', '.join(SEARCHABLE)}")
        if key in grid:
            raise ValueError(f"{flag} {key} is given twice; give its values once, comma-separated "
                             f"({flag} {key}=V1,V2,...)")
        given = [v.strip() for v in values.split(",") if v.strip()]
        factors = [v for v in given if relative and v.startswith("x")]
        for v in factors:
            if not re.fullmatch(r"x[0-9]*\.?[0-9]+", v) or float(v[1:]) <= 0 or key in ("batch_size", "epochs"):
                raise ValueError(f"{flag} {item!r}: {v!r} is not a multiple of the run's {key}; write xF with F > 0 "
                                 "(e.g. lr=x0.33,x1,x3), for a number-valued key other than batch_size and epochs")
        if factors:
            if len(factors) < len(given):
                raise ValueError(f"{flag} {item!r}: give every value of {key} as a multiple (xF) or none")
            grid[key] = list(dict.fromkeys(given))
            continue
        parsed = [load_yaml(v, f"{flag} {item}", lines=False) for v in given]
        hint = float if key == "drop_path" else next(f.type for f in fields(TrainConfig) if f.name == key)
        want = (int, float) if "float" in str(hint) else (int,) if "int" in str(hint) else (object,)
        bad = [v for v in parsed if isinstance(v, bool) or not isinstance(v, want)]
        if not parsed or bad:
            raise ValueError(f"{flag} {item!r}: give one or more {'numbers' if float in want else 'values'} "
                             f"separated by commas{f', not {bad[0]!r}' if bad else ''}")
        for v in parsed:  # the rule each value meets as a flag, named with the grid item it came from
            if key == "drop_path" and not 0 <= v < 1:
                raise ValueError(f"{flag} {item!r}: drop_path must be in [0, 1), not {v!r}")
            try:
                TrainConfig(**({} if key == "drop_path" else {key: v}))
            except ValueError as e:
                raise ValueError(f"{flag} {item!r}: {e}") from None
        grid[key] = list(dict.fromkeys(parsed))
    return grid


def resolve_grid(grid: dict[str, list], own: dict[str, Any]) -> dict[str, list]:
    """``grid`` with every ``xF`` value (``parse_grid(relative=True)``) as F times ``own[key]``, the value the run
    would use untuned, rounded to 4 significant digits so a setting's folder name stays short."""
    return {k: list(dict.fromkeys(float(f"{float(v[1:]) * own[k]:.4g}") if isinstance(v, str) and v.startswith("x")
                                  else v for v in values)) for k, values in grid.items()}


def grid_order(grid: dict[str, list]) -> list[dict]:
    """Every setting of ``grid`` in one seeded order: the order trials run in, so ``--budget N`` is the first
    N (a random subset of the grid) and any run of the sweep, killed and resumed or not, makes the same ones."""
    import itertools
    import random
    settings = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    random.Random(0).shuffle(settings)
    return settings


def setting_folder(params: dict) -> str:
    """A trial's folder name: its setting, so a trial asked again (a resumed kill) finds its own run."""
    return "_".join(f"{k}-{params[k]:g}" if isinstance(params[k], float) else f"{k}-{params[k]}" for k in sorted(params))


class Sweep:
    """One sweep's settings and folder; ``run()`` does it all, ``work()`` is one worker's share of the trials."""

    def __init__(self, out: Path, model: str, weights: str | None, data: str, method: str, method_opts: dict,
                 grid: dict[str, list], budget: int | None = None, config: str | None = None, pruner: Any = None,
                 seeds: list[int] | None = None, **train: Any):
        clash = sorted(set(grid) & {k for k, v in train.items() if v is not None})
        if clash:
            raise ValueError(f"--{clash[0].replace('_', '-')} is fixed and searched by --grid; drop one of the two")
        if seeds and train.get("seed") is not None:
            raise ValueError("--seed and --seeds both say which seed the trials use; give one of the two")
        # ``seeds``, several: each setting is scored by its mean val over them, so a rate that diverges at one
        # seed loses (one seed's val can reward the top of a grid that is unstable); one: the run's seed
        seeds = list(dict.fromkeys(seeds or []))
        if len(seeds) == 1:
            train["seed"] = seeds[0]
        self.seeds = seeds if len(seeds) > 1 else None
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
                                             "run": self.run_opts, **({"seeds": self.seeds} if self.seeds else {})}))

    def study(self):
        """The sweep's Optuna study on its journal (opened under the sweep's lock; a torn last record cut off)."""
        optuna = _optuna()
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend
        self.out.mkdir(parents=True, exist_ok=True)
        journal = self.out / "optuna.journal"
        with self.lock:
            repair_journal(journal)
            try:
                storage = JournalStorage(JournalFileBackend(str(journal.absolute()), lock_obj=self.lock))
            except Exception as e:  # noqa: BLE001 - any record the replay cannot take (bad JSON, missing fields)
                raise ValueError(f"sweep journal {journal} is damaged ({type(e).__name__}: {str(e)[:80]}); it is not a "
                                 f"record this sweep can resume: delete {self.out} (or pass another --output) and "
                                 "run the sweep again") from None
            return optuna.create_study(study_name="sweep", storage=storage, load_if_exists=True, direction="maximize",
                                       sampler=optuna.samplers.RandomSampler(seed=0),  # unused: settings are given
                                       pruner=self.pruner or optuna.pruners.MedianPruner(
                                           n_startup_trials=3, n_warmup_steps=max(1, self.epochs // 3)))

    @property
    def lock(self) -> FileLock:
        """The sweep's one lock (journal writes and claiming a trial); made per process, never pickled."""
        if getattr(self, "_lock", None) is None or self._lock[0] != os.getpid():
            self.out.mkdir(parents=True, exist_ok=True)
            self._lock = os.getpid(), FileLock(self.out / "sweep.lock")
        return self._lock[1]

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def claim(self, study):
        """The next trial this worker runs, or None when the budget is met or the grid is used up.  Under the
        sweep's lock: a trial whose worker is gone (its owner lock free) is marked failed, cut off, and its
        setting counts as not run; then the first setting in grid order not done, failed by its own error, or
        running in a live worker is asked as the next trial, owned by this process."""
        from optuna.trial import TrialState
        with self.lock:
            trials = study.get_trials(deepcopy=False)
            owners = self.out / "owners"
            for t in trials:
                if t.state == TrialState.RUNNING and not lock_held(owners / f"{t.user_attrs.get('owner')}.lock"):
                    study.tell(t.number, state=TrialState.FAIL)  # cut off by a kill: no "error" attribute
            trials = study.get_trials(deepcopy=False)
            if not any(t.state == TrialState.WAITING for t in trials):  # else: one asked by a killed claim first
                live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
                if sum(t.state in live for t in trials) >= self.trials:
                    return None
                taken = {setting_folder(t.params) for t in trials if t.state in live or "error" in t.user_attrs}
                todo = next((p for p in grid_order(self.grid) if setting_folder(p) not in taken), None)
                if todo is None:
                    return None
                study.enqueue_trial(todo)
            trial = study.ask()
            trial.set_user_attr("owner", self.owner())
            for k, v in self.grid.items():  # the setting is in the journal before the lock is let go
                trial.suggest_categorical(k, v)
            return trial

    def pending(self, study) -> bool:
        """Whether any trial is left to run: the budget not met and a setting of the grid not yet taken (done,
        or failed by its own error), as ``claim`` counts them."""
        from optuna.trial import TrialState
        trials = study.get_trials(deepcopy=False)
        live = (TrialState.COMPLETE, TrialState.PRUNED)
        if sum(t.state in live for t in trials) >= self.trials:
            return False
        taken = {setting_folder(t.params) for t in trials if t.state in live or "error" in t.user_attrs}
        return any(setting_folder(p) not in taken for p in grid_order(self.grid))

    def owner(self) -> str:
        """This process's name in the journal, and the lock it holds while it lives (until it exits)."""
        name = f"{socket.gethostname()}-{os.getpid()}"
        if name not in OWNERS:
            (self.out / "owners").mkdir(parents=True, exist_ok=True)
            OWNERS[name] = FileLock(self.out / "owners" / f"{name}.lock")
            OWNERS[name].acquire()
        return name

    def objective(self, trial) -> float:
        optuna = _optuna()
        """A setting's val top-1: its run's, or with several seeds their mean.  The pruner follows the first
        seed's curve (a setting pruned there runs no other seed)."""
        params = {k: trial.suggest_categorical(k, v) for k, v in self.grid.items()}
        folder = self.out / "trials" / setting_folder(params)
        trial.set_user_attr("folder", str(folder.relative_to(self.out)))

        def report(row: dict) -> None:
            trial.report(row["val_acc"], row["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"val {row['val_acc']:.1f}% at epoch {row['epoch']}, below the median")
        runs = [run_cell(folder / f"seed{seed}" if seed is not None else folder,
                         f"trial {trial.number} {params}" + (f" seed {seed}" if seed is not None else ""),
                         **self.run_args, on_epoch=report if i == 0 else None,
                         **{**self.train, **self.run_opts, "protocol": "search", "config": self.config}, **params,
                         **({"seed": seed} if seed is not None else {}))
                for i, seed in enumerate(self.seeds or [None])]
        trial.set_user_attr("selected_epoch", runs[0]["selected_epoch"])
        if self.seeds:
            trial.set_user_attr("val_by_seed", [round(r["val_acc"], 2) for r in runs])
        return sum(r["val_acc"] for r in runs) / len(runs)

    def work(self) -> None:
        """Run trials until the sweep has ``self.trials`` finished ones (several workers may share it).  A trial
        whose run stops by itself (NaN loss, ...) is failed with its one-line reason and does not use up the
        budget; any other error fails the trial and ends the worker with that error."""
        optuna = _optuna()
        from optuna.trial import TrialState
        from ..engine.trainer import TrainingStopped
        study = self.study()
        while (trial := self.claim(study)) is not None:
            try:
                value = self.objective(trial)
            except optuna.TrialPruned:
                study.tell(trial, state=TrialState.PRUNED)
                continue
            except Exception as e:
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                trial.set_user_attr("error", reason)
                study.tell(trial, state=TrialState.FAIL)
                if not isinstance(e, TrainingStopped):
                    raise
                print(f"trial {trial.number} {trial.params} failed: {reason}", flush=True)
                continue
            study.tell(trial, value)

    def run(self, launcher: Launcher | None = None) -> dict:
        """All trials (here or where ``launcher`` says), the choice on val, ``best.yaml``, then the final run."""
        best, best_yaml, trials = self.choose(launcher)
        final = run_cell(self.out / "final" / setting_folder(best.params), f"final run of {best.params}", **self.run_args,
                         **{**self.train, **self.run_opts, "protocol": "retrain", "config": str(best_yaml)},
                         **({"seed": self.seeds[0]} if self.seeds else {}))
        summary = {"best": best.params, "best_trial": best.number, "val_acc": best.value,
                   "trials": {state: sum(trial_state(t) == state for t in trials) for state in
                              ("complete", "pruned", "fail", "cut off")},
                   "final": {k: final[k] for k in ("protocol", "selected_epoch", "val_acc", "test_acc")},
                   "best_yaml": str(best_yaml)}
        atomic_write(self.out / "sweep.json", lambda f: f.write(json.dumps(summary, indent=1)), "w")
        print(f"best on val: {best.params} ({best.value:.2f}% val, trial {best.number}); retrained on train+val: "
              f"test top-1 {final['test_acc']:.2f}% -> {best_yaml}")
        return summary

    def choose(self, launcher: Launcher | None = None) -> tuple[Any, Path, list]:
        """All trials and the choice on val (no split but train and val is read): the best trial, its task YAML
        (``best.yaml``) and every trial.  A bench row tuned with ``--tune`` stops here and runs its cells with
        the YAML."""
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
        elif self.pending(study):  # workers share the journal: each claims the next setting in grid order until
            # the budget is met (none are started for a finished sweep: a bench's tuned rows are read back)
            launch([(f"sweep worker {i}", _work, {"sweep": self}) for i in range(launcher.workers)], launcher,
                   self.out / "logs")
        trials = self.study().trials
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        rank = {setting_folder(p): i for i, p in enumerate(grid_order(self.grid))}  # ties: the earlier setting,
        best = max(complete, key=lambda t: (t.value, -rank[setting_folder(t.params)])) if complete else None  # not trial number
        self.write_trials(trials, best.number if best else -1)
        if best is None:
            raise RuntimeError(f"no trial of the sweep in {self.out} finished (see trials.csv); widen the grid or "
                               "lower the learning rates")
        return best, self.write_best(best.params), trials

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
        rows = [{"trial": t.number, **t.params, "state": trial_state(t),
                 "val_acc": None if t.value is None else round(t.value, 2),
                 **({"val_by_seed": " ".join(map(str, t.user_attrs.get("val_by_seed", [])))} if self.seeds else {}),
                 "epochs_run": max(t.intermediate_values, default=None), "best": t.number == best} for t in trials]
        write_csv(self.out / "trials.csv", rows)
        keys = list(rows[0])
        md = markdown_table(keys, [[r.get(k) for k in keys] for r in rows])
        atomic_write(self.out / "trials.md", lambda f: f.write(md + "\n"), "w")
        self.plot(trials, best)

    def plot(self, trials, best: int) -> None:
        keys = list(self.grid)
        fig, axes = figure(1, len(keys), figsize=(3.2 * len(keys), 3), squeeze=False)
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
        save_figure(fig, self.out / "sweep.png")


def tune_row(out: Path, model: str, weights: str | None, spec: str, method: str, method_opts: dict | None,
             grid: dict[str, list], seeds: list[int] | None = None, **settings: Any) -> Path:
    """A bench row's own setting on one task (``rlrr bench --tune``): a sweep in ``out`` over ``grid`` (``xF``
    values as multiples of what the row would use untuned), trials on train scored on val (their mean over
    ``seeds`` when there are several), one after another in this process (a bench runs many rows' sweeps side
    by side instead), the run's protocol replaced by the sweep's; returns the chosen setting's task YAML, which
    the row's cells then run with."""
    train = {k: v for k, v in settings.items() if k != "protocol"}
    task, cfg, _ = plan(spec, method, method_opts, **{k: v for k, v in train.items() if k not in RUN_OPTIONS})
    own = {**cfg.settings(), "drop_path": task.get("drop_path", 0.0) if train.get("drop_path") is None
           else train["drop_path"]}
    sweep = Sweep(out, model, weights, spec, method, method_opts or {}, resolve_grid(grid, own), seeds=seeds, **train)
    return sweep.choose()[1]


def trial_state(trial) -> str:
    """complete, pruned, fail (its run failed: the reason is its ``error`` attribute), cut off (its worker was
    killed; the setting ran again in a later trial), running or waiting."""
    name = trial.state.name.lower()
    return "cut off" if name == "fail" and "error" not in trial.user_attrs else name


def repair_journal(journal: Path) -> None:
    """Cut a torn last record (a writer killed mid-write leaves a line without its newline) off the journal,
    so the next record does not land on it and make the whole journal unreadable.  Call under the lock."""
    if not journal.is_file() or journal.stat().st_size == 0:
        return
    data = journal.read_bytes()
    if not data.endswith(b"\n"):
        with open(journal, "rb+") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _work(sweep: Sweep) -> None:
    sweep.work()
