"""Experiment tracking (``--log tensorboard,mlflow,wandb``): a run's config, parameter counts, per-epoch
metrics and learning rate, its final test and its curves figure, sent to the trackers people compare runs
in, each through its own library (the ``track`` extra).  The trainer calls four methods and knows nothing
of any tracker; JSONL/CSV/PNG in the run folder stay the record of truth.

Where each writes: TensorBoard event files in ``<run>/tensorboard`` (point ``tensorboard --logdir`` at a
grid's folder to see every cell); MLflow into ``$MLFLOW_TRACKING_URI``, else a SQLite store
``<group>/mlflow.db`` shared by a grid's cells (experiment = the grid, one run per cell); W&B offline
unless ``WANDB_MODE`` says otherwise, in ``<run>/wandb`` (``wandb sync`` uploads it), group = the grid.
A resumed run continues its MLflow and W&B runs (their ids are kept in ``<run>/tracking.json``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..config import flat
from ..extras import need
from ..files import atomic_write

TRACKERS = ("tensorboard", "mlflow", "wandb")
EXTRA = "track"


def parse_trackers(value: str | list | tuple | None) -> tuple[str, ...]:
    """``"tensorboard,wandb"`` (or a list) as a checked tuple; unknown names are one line naming the choices."""
    if not value:
        return ()
    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    bad = [n for n in names if n not in TRACKERS]
    if bad:
        raise ValueError(f"--log {bad[0]!r} is not a tracker; choose any of {', '.join(TRACKERS)} (comma-separated)")
    return tuple(dict.fromkeys(names))


class Tracking:
    """The trackers of one run.  ``start`` (config and parameter counts), ``epoch`` (one metrics row),
    ``finish`` (test result and figure); ``close`` ends them however the run ended."""

    def __init__(self, names: tuple[str, ...], out: Path, run_name: str, group: str | None = None):
        self.names, self.out, self.run_name = names, Path(out), run_name
        self.group = Path(group) if group else self.out
        self.ids_file = self.out / "tracking.json"
        self.ids = json.loads(self.ids_file.read_text()) if self.ids_file.is_file() else {}
        self.tb = self.mlflow = self.wandb = None
        self.started = False
        for name in names:  # every library first, so a missing one is said before any run starts
            need(EXTRA, f"--log {name}", {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}[name])

    def start(self, config: dict, counts: dict) -> None:
        self.started = True
        params = flat({**config, "params": counts})
        if "tensorboard" in self.names:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(log_dir=str(self.out / "tensorboard"))
            self.tb.add_text("config", "\n".join(f"    {k}: {v}" for k, v in params.items()))
        if "mlflow" in self.names:
            from mlflow.tracking import MlflowClient
            uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(self.group / 'mlflow.db').absolute()}"
            self.group.mkdir(parents=True, exist_ok=True)
            client = MlflowClient(tracking_uri=uri)
            run_id = self.ids.get("mlflow")
            if run_id is None:
                name = self.group.absolute().name
                exp = client.get_experiment_by_name(name)
                exp_id = exp.experiment_id if exp else client.create_experiment(
                    name, artifact_location=(self.group / "mlartifacts").absolute().as_uri())
                run_id = client.create_run(exp_id, run_name=self.run_name, tags={"rlrr.group": str(self.group)}).info.run_id
                for k, v in params.items():
                    client.log_param(run_id, k, str(v)[:6000])
                self.remember("mlflow", run_id)
            self.mlflow = client, run_id
        if "wandb" in self.names:
            import wandb
            mode = os.environ.get("WANDB_MODE") or "offline"
            (self.out / "wandb").mkdir(parents=True, exist_ok=True)
            run = wandb.init(mode=mode, dir=str(self.out), project=os.environ.get("WANDB_PROJECT", "rlrr"),
                             group=self.group.absolute().name, name=self.run_name, config=params,
                             id=self.ids.get("wandb"), resume="allow", reinit="create_new",
                             settings=wandb.Settings(silent=True))
            self.remember("wandb", run.id)
            self.wandb = run

    def remember(self, key: str, value: str) -> None:
        self.ids[key] = value
        atomic_write(self.ids_file, lambda f: f.write(json.dumps(self.ids)), "w")

    def epoch(self, row: dict, step: int) -> None:
        """One row of metrics.jsonl (epoch, phase, losses, accuracies, lr) at ``step``, the epochs run so far
        (a retrain's second phase counts on from the first)."""
        metrics = {k: float(v) for k, v in row.items() if isinstance(v, (int, float))
                   and not isinstance(v, bool) and v == v}
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.mlflow is not None:
            client, run_id = self.mlflow
            for k, v in metrics.items():
                client.log_metric(run_id, k, v, step=step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def finish(self, result: dict, figure: Path | None) -> None:
        """The final numbers (test and selected val top-1, parameter counts) and the curves figure."""
        final = {k: float(result[k]) for k in ("test_acc", "val_acc", "trainable_params", "method_params")
                 if isinstance(result.get(k), (int, float))}
        if self.tb is not None:
            for k, v in final.items():
                self.tb.add_scalar(f"final/{k}", v, 0)
            if figure is not None and figure.is_file():
                import numpy as np
                from PIL import Image
                self.tb.add_image("curves", np.asarray(Image.open(figure).convert("RGB")), 0, dataformats="HWC")
        if self.mlflow is not None:
            client, run_id = self.mlflow
            for k, v in final.items():
                client.log_metric(run_id, f"final_{k}", v)
            if figure is not None and figure.is_file():
                client.log_artifact(run_id, str(figure))
        if self.wandb is not None:
            import wandb
            self.wandb.summary.update(final)
            if figure is not None and figure.is_file():
                self.wandb.log({"curves": wandb.Image(str(figure))})
        self.close("FINISHED")

    def close(self, status: str = "KILLED") -> None:
        """End every tracker's run (``FINISHED`` after ``finish``, else the run stopped early)."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.mlflow is not None:
            (client, run_id), self.mlflow = self.mlflow, None
            client.set_terminated(run_id, status)
        if self.wandb is not None:
            run, self.wandb = self.wandb, None
            run.finish(exit_code=0 if status == "FINISHED" else 1)
