"""One cell of a grid (a bench, a study, a sweep's trial): what a row is, running a cell or reading a finished one
back (refusing one run with other settings), and the ``rlrr train`` line that reruns a cell alone."""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import flat
from ..engine.experiment import plan, run_experiment


@dataclass(frozen=True)
class Row:
    """One line of a bench or study table: its label, the method and the method's options."""
    label: str
    method: str
    options: dict = field(default_factory=dict)

    @property
    def folder(self) -> str:
        """The cell folder's name: the method for a plain row (the bench's layout), else the method and its
        options, so a row two studies share (RLRR's defaults) is one cell in one output folder."""
        if not self.options:
            return self.method
        parts = [f"{k}-{','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for k, v in self.options.items()]
        return re.sub(r"[^A-Za-z0-9._,+-]", "-", "_".join([self.method, *parts]))


def cell_command(call: dict, config: dict, tune: dict | None = None) -> str:
    """The ``rlrr train`` line that runs one cell again on its own (same data, method, options, seed, rate and
    the grid's training values; a tuned row's chosen values written out), so a table row can be re-checked
    without its bench."""
    import shlex
    args = ["rlrr", "train", "--model", call["model"], "--weights", call["weights"], "--data", call["spec"],
            "--method", call["method"]]
    for k, v in (call.get("method_opts") or {}).items():
        args += ["--method-opt", f"{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"]
    keys = ["lr", *(tune or {}), *(k for k in ("epochs", "warmup_epochs", "protocol") if call.get(k) is not None)]
    for k in dict.fromkeys(keys):
        value = call.get(k) if k in ("epochs", "warmup_epochs", "protocol") else config.get(k, call.get(k))
        if value is not None and not (k == "drop_path" and value == 0):
            args += [f"--{k.replace('_', '-')}", f"{value:g}" if isinstance(value, float) else str(value)]
    args += ["--seed", str(call["seed"]), "--output", f"runs/recheck/{call['cell'].parent.parent.name}/"
             f"{call['cell'].parent.name}/{call['cell'].name}"]
    return shlex.join(args)


def run_cell(cell: Path, label: str, model: str, weights: str, spec: str, method: str,
             method_opts: dict | None = None, on_epoch=None, **settings) -> dict:
    """One grid cell: the summary of a finished cell, else the run that finishes it (resuming its
    checkpoint), so an interrupted grid continues where it stopped.  A finished cell is reused only if
    it was run with what the cell would use now (a rate or option changed in ``rlrr/configs/`` since, or
    another ``--model``, is refused by name rather than mixed into the table)."""
    done = cell / "summary.json"
    if done.is_file():
        try:
            res = json.loads(done.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{done} is not readable JSON (a cell cut off mid-write?); delete {cell} to re-run "
                             "that cell") from None
        changed = changes(res, model, spec, method, method_opts, settings, weights)
        if changed:
            raise ValueError(f"{cell} was run with {changed}; delete that folder to re-run it with the current "
                             "settings, or pass another --output")
        score = f"{res['test_acc']:.2f}% test" if res.get("test_acc") is not None else f"{res['val_acc']:.2f}% val"
        print(f"{label}: done, {score}")  # a sweep's trial is never tested
        return res
    print(f"{label}: running", flush=True)
    return run_experiment(model, weights, spec, cell, method, method_opts, resume=True, verbose=False,
                          restart=f"delete {cell} to re-run that cell", progress=False, on_epoch=on_epoch, **settings)


# What a run takes beside its training values (``run_experiment``'s own arguments), compared where recorded.
RUN_OPTIONS = ("drop_path", "aug", "img_size", "num_classes", "skip_bad_images")


def changes(res: dict, model: str, spec: str, method: str, method_opts: dict | None, settings: dict,
            weights: str) -> str:
    """What a finished cell's summary.json recorded that differs from what the cell would use now
    ('' when nothing): every training value, every method option, the model, its weights and the data.  A value the
    record lacks belongs to an option added since, whose default keeps the old behaviour: not a change."""
    settings = dict(settings)
    run = {k: settings.pop(k) for k in RUN_OPTIONS if k in settings}
    task, cfg, mcfg = plan(spec, method, method_opts, **settings)
    recorded = res.get("settings", {})
    given = {"drop_path": task.get("drop_path", 0.0) if run.get("drop_path") is None else run["drop_path"],
             "aug": run.get("aug") or task.get("aug"), "img_size": run.get("img_size"), "weights": str(weights)}
    extra = {k: v for k, v in given.items() if k in recorded}
    now = flat({**cfg.settings(), "method": asdict(mcfg), "model": model, "data": spec, **extra})
    was = flat({**{k: v for k, v in res["config"].items() if k in cfg.settings()},
                "method": res.get("method_config", {}), "model": recorded.get("model", model),
                "data": recorded.get("data", spec), **{k: recorded[k] for k in extra}})
    return ", ".join(f"{k}={v!r} (now {now.get(k)!r})" for k, v in was.items() if v != now.get(k))
