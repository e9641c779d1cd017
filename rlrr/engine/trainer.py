"""The training driver: protocols, checkpoints, resume, metrics files.  Method-agnostic: it receives a
factory that returns a model with its method already applied and trains what ``requires_grad``.

Protocols (``TrainConfig.protocol``), recorded in every results file:
* ``retrain`` (default, honest): train on ``train``, pick the epoch with the best ``val`` accuracy,
  train a fresh model on ``trainval`` for that many epochs of the same schedule, test once.
* ``val``: as above without the retraining; the best-on-val checkpoint is tested once.
* ``test``: the official code's practice — train on ``trainval``, evaluate ``test`` after every
  epoch and report the best (model selection on the test set; numbers are optimistic).
* ``search``: train on ``train``, pick on ``val``, never test (a sweep trial: the test split is read only
  once a setting is chosen).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..adapter import adapter_state, batchnorm_stats, save_adapter
from ..card import write_card
from ..files import FileLock, atomic_write, write_csv
from ..methods.base import cross_entropy, summary, trainable_parameters
from ..version import code_commit
from . import distributed as dist
from .checkpointing import enable_grad_checkpointing
from .compile import compiled
from .loop import NonFiniteLoss, StepConfig, evaluate, train_one_epoch
from .optim import build_optimizer, build_scheduler
from .tracking import Tracking, parse_trackers

PROTOCOLS = ("retrain", "val", "test", "search")
# What each protocol runs: phases of (name, split trained on, split evaluated each epoch — the one the epoch
# is chosen on; None: none, the epoch count is the one chosen before).  A resumed run continues its phase.
PHASES = {"retrain": [("select", "train", "val"), ("final", "trainval", None)],
          "val": [("select", "train", "val")], "search": [("select", "train", "val")],
          "test": [("official", "trainval", "test")]}
RUN_FILES = ("checkpoint.pt", "summary.json", "adapter.safetensors", "best_adapter.safetensors", "metrics.jsonl",
             "metrics.csv", "curves.png")
# may change on --resume: how a run is executed, not what it computes
NOT_SETTINGS = {"progress", "num_workers", "eval_batch_size", "device", "grad_checkpointing", "compile", "log",
                "log_group"}


class TrainingStopped(RuntimeError):
    """Training could not go on; the message says why and where the last good checkpoint is."""


@dataclass
class TrainConfig:
    epochs: int = 100
    warmup_epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 5e-5
    batch_size: int = 32
    min_lr: float = 1e-8
    warmup_lr: float = 1e-7
    amp: str = "none"
    grad_accum: int = 1
    clip_grad: float | None = None
    label_smoothing: float = 0.0
    seed: int = 0
    deterministic: bool = False
    num_workers: int = 0
    protocol: str = "retrain"
    eval_batch_size: int = 256
    progress: bool = True
    device: str = "auto"
    grad_checkpointing: bool = False  # recompute each block's activations in backward (memory for time)
    compile: str = "none"  # a torch.compile backend (inductor, aot_eager, ...) or none
    log: str = ""  # experiment trackers, comma-separated: tensorboard, mlflow, wandb (``engine/tracking.py``)
    log_group: str = ""  # the folder of the grid a run belongs to (its trackers group the grid's runs)

    def __post_init__(self) -> None:
        """Every value checked where it enters, with the flag that sets it named."""
        self.log = ",".join(parse_trackers(self.log))
        rules = {"epochs": (self.epochs >= 1, "at least 1"), "warmup_epochs": (self.warmup_epochs >= 0, "0 or more"),
                 "lr": (0 < self.lr < math.inf, "a positive number"),
                 "weight_decay": (0 <= self.weight_decay < math.inf, "0 or more"),
                 "batch_size": (self.batch_size >= 1, "at least 1"), "min_lr": (self.min_lr >= 0, "0 or more"),
                 "warmup_lr": (self.warmup_lr >= 0, "0 or more"), "amp": (self.amp in ("none", "bf16", "fp16"),
                                                                          "none, bf16 or fp16"),
                 "grad_accum": (self.grad_accum >= 1, "at least 1"),
                 "clip_grad": (self.clip_grad is None or 0 < self.clip_grad < math.inf, "a positive number"),
                 "label_smoothing": (0 <= self.label_smoothing < 1, "in [0, 1)"), "seed": (self.seed >= 0, "0 or more"),
                 "num_workers": (self.num_workers >= 0, "0 or more"), "protocol": (self.protocol in PROTOCOLS,
                                                                                  " / ".join(PROTOCOLS)),
                 "eval_batch_size": (self.eval_batch_size >= 1, "at least 1"),
                 "device": (self.device in ("auto", "cpu", "cuda"), "auto, cpu or cuda")}
        for name, (ok, want) in rules.items():
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')} must be {want}, not {getattr(self, name)!r}")

    def settings(self) -> dict:
        """The values a resumed run must share with the run it continues."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in NOT_SETTINGS}


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise TrainingStopped(f"output folder {out} is not writable ({e.strerror}); pass --output a writable folder") from None


@contextlib.contextmanager
def run_lock(out: Path):
    """Hold ``out/.lock`` for the run: a second run into the same folder is refused while this one lives;
    the OS drops the lock when the process ends, so a crashed run never leaves it stuck."""
    lock = FileLock(out / ".lock", blocking=False)
    if not lock.acquire():
        raise TrainingStopped(f"{out} is in use by another running rlrr train (pid {lock.holder()}); wait for it "
                              "to end or pass another --output")
    try:
        yield
    finally:
        lock.release()


class Trainer:
    """``settings``: what else identifies the run (model, weights, data, method, ...), checked on resume;
    ``overwrite``: replace a finished or unfinished run in ``out`` instead of refusing; ``restart``: how the
    caller starts a run over, said where a run cannot go on."""

    def __init__(self, make_model: Callable[[], torch.nn.Module], splits, cfg: TrainConfig, out: Path,
                 settings: dict | None = None, overwrite: bool = False,
                 restart: str = "pass --overwrite to start over", on_epoch: Callable[[dict], None] | None = None):
        self.make_model, self.splits, self.cfg, self.out = make_model, splits, cfg, Path(out)
        self.on_epoch = on_epoch  # sees each epoch's row once it is saved; may stop the run by raising (a pruner)
        self.overwrite, self.restart = overwrite, restart
        self.rank, self.world, self.device = dist.setup(cfg.device)
        if self.rank == 0:
            check_writable(self.out)
        self.ckpt_path = self.out / "checkpoint.pt"
        self.last_good = "none yet"
        self.state = {"phase": None, "epoch": 0, "history": [], "best": None, "selected_epochs": None,
                      "protocol": cfg.protocol, "config": asdict(cfg), "wall_s": 0.0,
                      "settings": json.loads(json.dumps({**(settings or {}), **cfg.settings()}))}

    # -- loaders -------------------------------------------------------------------------------
    def loader(self, ds: Dataset, train: bool, epoch: int = 0) -> DataLoader:
        if train:
            g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)  # order depends on epoch only
            sampler = dist.train_sampler(ds, self.cfg.seed + epoch, g)
            bs = max(1, self.cfg.batch_size // self.world)
            return DataLoader(ds, bs, sampler=sampler, drop_last=len(ds) > bs, num_workers=self.cfg.num_workers,
                              worker_init_fn=_seed_worker, generator=g, pin_memory=self.device.type == "cuda")
        return DataLoader(ds, self.cfg.eval_batch_size, num_workers=self.cfg.num_workers)

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, model, opt, sched, scaler) -> None:
        if self.rank != 0:
            return
        state = {"state": json.dumps(self.state), "model": adapter_state(dist.unwrap(model)), "optim": opt.state_dict(),
                 "sched": sched.state_dict(), "rng": torch.get_rng_state(), "scaler": scaler.state_dict() if scaler else {}}
        atomic_write(self.ckpt_path, lambda f: torch.save(state, f))

    def read_checkpoint(self) -> dict:
        try:
            return torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - truncated, foreign or pickled-code files all mean the same
            raise TrainingStopped(f"{self.ckpt_path} is not a readable rlrr checkpoint ({type(e).__name__}); "
                                  f"{self.restart}") from None

    def load_checkpoint(self, model, opt, sched, scaler) -> None:
        ck = self.read_checkpoint()
        own = dict(dist.unwrap(model).named_parameters()) | batchnorm_stats(dist.unwrap(model))
        with torch.no_grad():
            for k, v in ck["model"].items():
                own[k].copy_(v)
        opt.load_state_dict(ck["optim"])
        sched.load_state_dict(ck["sched"])
        if scaler and ck["scaler"]:
            scaler.load_state_dict(ck["scaler"])
        torch.set_rng_state(ck["rng"])

    def _resume_state(self, resume: bool) -> dict | None:
        """The saved state to continue, after refusing what would lose work or mix two runs."""
        finished, started = (self.out / "summary.json").is_file(), self.ckpt_path.is_file()
        if self.overwrite:
            if self.rank == 0:
                for f in RUN_FILES:
                    (self.out / f).unlink(missing_ok=True)
            return None
        if not resume:
            if finished or started:
                what = "a finished run (summary.json)" if finished else "an unfinished run (checkpoint.pt)"
                raise TrainingStopped(f"{self.out} holds {what}; pass --resume to continue it, --overwrite to "
                                      "replace it, or another --output")
            return None
        if not started:
            if finished:
                raise TrainingStopped(f"{self.out} holds a finished run without checkpoint.pt to resume; "
                                      f"{self.restart}")
            if self.rank == 0:
                print(f"no checkpoint in {self.out}; starting from scratch")
            return None
        saved = json.loads(self.read_checkpoint()["state"])
        old, new = saved.get("settings", {}), self.state["settings"]
        # a key the checkpoint lacks is an option added since, whose default keeps the old behaviour
        changed = [k for k in old if old[k] != new.get(k)]
        if changed:
            diff = ", ".join(f"{k}={old.get(k)!r} (now {new.get(k)!r})" for k in changed)
            raise TrainingStopped(f"--resume: {self.ckpt_path} was saved with {diff}; resume with the same "
                                  f"settings or {self.restart}")
        return saved

    # -- the run ---------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict:
        if self.rank != 0:
            return self._fit(resume)
        with run_lock(self.out):
            return self._fit(resume)

    def _fit(self, resume: bool) -> dict:
        cfg = self.cfg
        resumed = self._resume_state(resume)
        self.tracking = None
        if cfg.log and self.rank == 0:
            group = Path(cfg.log_group) if cfg.log_group else None
            name = str(self.out.absolute().relative_to(group.absolute())) if group and \
                self.out.absolute().is_relative_to(group.absolute()) else self.out.name
            self.tracking = Tracking(parse_trackers(cfg.log), self.out, name, cfg.log_group or None)
        try:
            return self._phases(resumed)
        except BaseException:
            if self.tracking is not None:
                self.tracking.close("FAILED")
            raise

    def _phases(self, resumed: dict | None) -> dict:
        cfg = self.cfg
        if resumed:
            self.state = resumed
        phases = PHASES[cfg.protocol]
        names = [p for p, *_ in phases]
        start = names.index(self.state["phase"]) if self.state["phase"] in names else 0
        model = None
        for i, (phase, train_split, eval_split) in enumerate(phases[start:], start):
            continuing = resumed is not None and i == start
            if not continuing:
                self.state.update(phase=phase, epoch=0)
            epochs = cfg.epochs if phase != "final" else self.state["selected_epochs"]
            model = self.run_phase(phase, train_split, eval_split, epochs, continuing)
        self.last_model = dist.unwrap(model)
        return self.finish(model)

    def run_phase(self, phase: str, train_split: str, eval_split: str | None, stop_after: int, continuing: bool):
        cfg = self.cfg
        seed_everything(cfg.seed, cfg.deterministic)
        model = self.make_model().to(self.device)
        if cfg.grad_checkpointing:
            enable_grad_checkpointing(model)
        model = compiled(dist.wrap(model, self.device), cfg.compile)
        train_ds = self.splits[train_split]
        steps = math.ceil(len(self.loader(train_ds, True)) / cfg.grad_accum)
        opt = build_optimizer(model, cfg.lr, cfg.weight_decay)
        sched = build_scheduler(opt, cfg.epochs * steps, cfg.warmup_epochs * steps, cfg.min_lr, cfg.warmup_lr)
        scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
        if continuing:
            self.load_checkpoint(model, opt, sched, scaler)
        if self.tracking is not None and self.tracking.started is False:
            self.tracking.start({**self.state["settings"], **asdict(cfg)}, summary(dist.unwrap(model)))
        step_cfg = StepConfig(cfg.amp, cfg.grad_accum, cfg.clip_grad, cfg.label_smoothing)
        objective = getattr(dist.unwrap(model), "objective", None) or cross_entropy  # a method may bring its own
        show = cfg.progress and self.rank == 0
        if continuing and self.state["epoch"]:
            self.last_good = f"{self.ckpt_path} (end of epoch {self.state['epoch'] - 1})"
        for epoch in range(self.state["epoch"], stop_after):
            t0 = time.time()
            try:
                stats = train_one_epoch(model, self.loader(train_ds, True, epoch), opt, sched, step_cfg,
                                        self.device, epoch, scaler, show, objective)
            except NonFiniteLoss as e:
                raise TrainingStopped(f"{e}; last good checkpoint: {self.last_good}") from None
            row = {"phase": phase, "epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], **stats}
            ev = evaluate(model, self.loader(self.splits[eval_split], False), self.device, cfg.amp) \
                if eval_split is not None else None
            if not (math.isfinite(ev["loss"]) if ev else all(p.isfinite().all() for _, p in trainable_parameters(model))):
                raise TrainingStopped(f"the weights diverged in epoch {epoch} ({eval_split or 'weights'} not finite); "
                                      f"lower --lr or use --clip-grad; last good checkpoint: {self.last_good}")
            with self.writing():
                if ev is not None:
                    row.update({f"{eval_split}_acc": ev["acc"], f"{eval_split}_loss": ev["loss"]})
                    best = self.state["best"]
                    if best is None or ev["acc"] > best["acc"]:
                        self.state["best"] = {"epoch": epoch + 1, "acc": ev["acc"], "split": eval_split}
                        if self.rank == 0:
                            save_adapter(dist.unwrap(model), self.out / "best_adapter.safetensors",
                                         {"epoch": str(epoch + 1), **self.adapter_meta()})
                row["epoch_s"] = round(time.time() - t0, 2)
                self.state["wall_s"] += row["epoch_s"]
                self.state["history"].append(row)
                self.state["epoch"] = epoch + 1
                self.save_checkpoint(model, opt, sched, scaler)
                self.last_good = f"{self.ckpt_path} (end of epoch {epoch})"
                if self.rank == 0:
                    self.write_metrics()
                if self.tracking is not None:
                    self.tracking.epoch(row, len(self.state["history"]))
            if show:
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                      flush=True)
            if self.on_epoch is not None and self.rank == 0:
                self.on_epoch(row)
        if phase == "select":
            self.state["selected_epochs"] = self.state["best"]["epoch"]
        return model

    def finish(self, model) -> dict:
        """Test once (honest protocols), write the adapter, summary.json and the learning-curve PNG."""
        cfg, st = self.cfg, self.state
        plain = dist.unwrap(model)
        dist.barrier()  # rank 0's last best_adapter write must land before anyone reads it
        if cfg.protocol == "val":  # test the best-on-val checkpoint, not the last epoch
            from ..adapter import load_adapter
            load_adapter(plain, self.out / "best_adapter.safetensors")
        if cfg.protocol == "test":
            test = {"acc": st["best"]["acc"], "note": "max over epochs of test accuracy (selection on test)"}
        elif cfg.protocol == "search":
            test = {"acc": None}
        else:
            test = evaluate(plain, self.loader(self.splits.test, False), self.device, cfg.amp, progress=cfg.progress)
        result = {"dataset": self.splits.name, "num_classes": self.splits.num_classes, "protocol": cfg.protocol,
                  "selection": {"retrain": "best val epoch, retrained on trainval", "val": "best val epoch",
                                "search": "best val epoch, not tested",
                                "test": "best test epoch (official practice)"}[cfg.protocol],
                  "selected_epoch": st["best"]["epoch"], "val_acc": st["best"]["acc"] if cfg.protocol != "test" else None,
                  "test_acc": test["acc"], "train_wall_s": round(st["wall_s"], 1), "world_size": self.world,
                  "code": code_commit(),
                  **summary(plain), "method_config": _method_config(plain), "config": asdict(cfg),
                  "settings": st["settings"]}
        if self.rank == 0:
            from .report import plot_history
            with self.writing():
                save_adapter(plain, self.out / "adapter.safetensors", self.adapter_meta())
                plot_history(st["history"], self.out / "curves.png", title=f"{result['method']} on {self.splits.name}")
                write_card(self.out / "README.md", result)  # the Hub's model card: what the folder holds
                text = json.dumps(result, indent=1)
                atomic_write(self.out / "summary.json", lambda f: f.write(text), "w")  # last: marks it finished
            if self.tracking is not None:
                self.tracking.finish(result, self.out / "curves.png")
        dist.barrier()
        return result

    def adapter_meta(self) -> dict[str, str]:
        """What an adapter file of this run records beside its tensors: the protocol, and the task's class
        names (by class id) so that predictions and a served bank can say names, not indices."""
        return {"protocol": self.cfg.protocol, "class_names": json.dumps(self.splits.class_names)}

    @contextlib.contextmanager
    def writing(self):
        """Turn a failed write (full disk, folder removed) into one line that keeps the last good checkpoint."""
        try:
            yield
        except OSError as e:
            raise TrainingStopped(f"cannot write to {self.out} ({e.strerror or e}); free space or pass another "
                                  f"--output, then rerun with --resume; last good checkpoint: {self.last_good}") from None

    def write_metrics(self) -> None:
        hist = self.state["history"]
        atomic_write(self.out / "metrics.jsonl", lambda f: f.write("".join(json.dumps(r) + "\n" for r in hist)), "w")
        write_csv(self.out / "metrics.csv", hist)


def _method_config(model) -> dict:
    cfg = getattr(model, "rlrr_config", None)
    return asdict(cfg) if cfg is not None else {}


def _seed_worker(worker_id: int) -> None:
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)
