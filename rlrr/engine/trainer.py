"""The training driver: protocols, checkpoints, resume, metrics files.  Method-agnostic: it receives a
factory that returns a model with its method already applied and trains what ``requires_grad``.

Protocols (``TrainConfig.protocol``), recorded in every results file:
* ``retrain`` (default, honest): train on ``train``, pick the epoch with the best ``val`` accuracy,
  train a fresh model on ``trainval`` for that many epochs of the same schedule, test once.
* ``val``: as above without the retraining; the best-on-val checkpoint is tested once.
* ``test``: the official code's practice — train on ``trainval``, evaluate ``test`` after every
  epoch and report the best (model selection on the test set; numbers are optimistic).
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..adapter import adapter_state, batchnorm_stats, save_adapter
from ..methods.base import summary
from . import distributed as dist
from .loop import NonFiniteLoss, StepConfig, evaluate, train_one_epoch
from .optim import build_optimizer, build_scheduler

PROTOCOLS = ("retrain", "val", "test")


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


def atomic_save(obj: dict, path: Path) -> None:
    """torch.save to a temp file, fsync, rename: a crash mid-write never corrupts the checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


class Trainer:
    def __init__(self, make_model: Callable[[], torch.nn.Module], splits, cfg: TrainConfig, out: Path):
        if cfg.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, not {cfg.protocol!r}")
        self.make_model, self.splits, self.cfg, self.out = make_model, splits, cfg, Path(out)
        self.rank, self.world, self.device = dist.setup(cfg.device)
        if self.rank == 0:
            check_writable(self.out)
        self.ckpt_path = self.out / "checkpoint.pt"
        self.state = {"phase": None, "epoch": 0, "history": [], "best": None, "selected_epochs": None,
                      "protocol": cfg.protocol, "config": asdict(cfg), "wall_s": 0.0}

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
        atomic_save({"state": json.dumps(self.state), "model": adapter_state(dist.unwrap(model)),
                     "optim": opt.state_dict(), "sched": sched.state_dict(), "rng": torch.get_rng_state(),
                     "scaler": scaler.state_dict() if scaler else {}}, self.ckpt_path)

    def load_checkpoint(self, model, opt, sched, scaler) -> None:
        ck = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
        own = dict(dist.unwrap(model).named_parameters()) | batchnorm_stats(dist.unwrap(model))
        with torch.no_grad():
            for k, v in ck["model"].items():
                own[k].copy_(v)
        opt.load_state_dict(ck["optim"])
        sched.load_state_dict(ck["sched"])
        if scaler and ck["scaler"]:
            scaler.load_state_dict(ck["scaler"])
        torch.set_rng_state(ck["rng"])

    def _resume_state(self) -> dict | None:
        if not self.ckpt_path.is_file():
            return None
        ck = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
        return json.loads(ck["state"])

    # -- the run ---------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict:
        cfg = self.cfg
        resumed = self._resume_state() if resume else None
        if resume and resumed is None and self.rank == 0:
            print(f"no checkpoint in {self.out}; starting from scratch")
        if resumed:
            self.state = resumed
        phases = {"retrain": [("select", "train", "val"), ("final", "trainval", None)],
                  "val": [("select", "train", "val")], "test": [("official", "trainval", "test")]}[cfg.protocol]
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
        model = dist.wrap(model, self.device)
        train_ds = self.splits[train_split]
        steps = math.ceil(len(self.loader(train_ds, True)) / cfg.grad_accum)
        opt = build_optimizer(model, cfg.lr, cfg.weight_decay)
        sched = build_scheduler(opt, cfg.epochs * steps, cfg.warmup_epochs * steps, cfg.min_lr, cfg.warmup_lr)
        scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
        if continuing:
            self.load_checkpoint(model, opt, sched, scaler)
        step_cfg = StepConfig(cfg.amp, cfg.grad_accum, cfg.clip_grad, cfg.label_smoothing)
        show = cfg.progress and self.rank == 0
        for epoch in range(self.state["epoch"], stop_after):
            t0 = time.time()
            try:
                stats = train_one_epoch(model, self.loader(train_ds, True, epoch), opt, sched, step_cfg,
                                        self.device, epoch, scaler, show)
            except NonFiniteLoss as e:
                where = f"{self.ckpt_path} (end of epoch {epoch - 1})" if epoch else "none yet"
                raise TrainingStopped(f"{e}; last good checkpoint: {where}") from None
            row = {"phase": phase, "epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], **stats}
            if eval_split is not None:
                ev = evaluate(model, self.loader(self.splits[eval_split], False), self.device, cfg.amp)
                row.update({f"{eval_split}_acc": ev["acc"], f"{eval_split}_loss": ev["loss"]})
                best = self.state["best"]
                if best is None or ev["acc"] > best["acc"]:
                    self.state["best"] = {"epoch": epoch + 1, "acc": ev["acc"], "split": eval_split}
                    if self.rank == 0:
                        save_adapter(dist.unwrap(model), self.out / "best_adapter.safetensors",
                                     {"epoch": str(epoch + 1), "protocol": cfg.protocol})
            row["epoch_s"] = round(time.time() - t0, 2)
            self.state["wall_s"] += row["epoch_s"]
            self.state["history"].append(row)
            self.state["epoch"] = epoch + 1
            self.save_checkpoint(model, opt, sched, scaler)
            if self.rank == 0:
                self.write_metrics()
                if show:
                    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                          flush=True)
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
        else:
            test = evaluate(plain, self.loader(self.splits.test, False), self.device, cfg.amp, progress=cfg.progress)
        result = {"dataset": self.splits.name, "num_classes": self.splits.num_classes, "protocol": cfg.protocol,
                  "selection": {"retrain": "best val epoch, retrained on trainval", "val": "best val epoch",
                                "test": "best test epoch (official practice)"}[cfg.protocol],
                  "selected_epoch": st["best"]["epoch"], "val_acc": st["best"]["acc"] if cfg.protocol != "test" else None,
                  "test_acc": test["acc"], "train_wall_s": round(st["wall_s"], 1), "world_size": self.world,
                  **summary(plain), "method_config": _method_config(plain), "config": asdict(cfg)}
        if self.rank == 0:
            save_adapter(plain, self.out / "adapter.safetensors", {"protocol": cfg.protocol})
            (self.out / "summary.json").write_text(json.dumps(result, indent=1))
            from .report import plot_history
            plot_history(st["history"], self.out / "curves.png", title=f"{result['method']} on {self.splits.name}")
        dist.barrier()
        return result

    def write_metrics(self) -> None:
        hist = self.state["history"]
        (self.out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hist))
        keys = list(dict.fromkeys(k for r in hist for k in r))
        with open(self.out / "metrics.csv", "w", newline="") as f:
            w = csv.DictWriter(f, keys)
            w.writeheader()
            w.writerows(hist)


def _method_config(model) -> dict:
    cfg = getattr(model, "peft_config", None)
    return asdict(cfg) if cfg is not None else {}


def _seed_worker(worker_id: int) -> None:
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)
