"""Checked-in per-task configs (``configs/<kind>/<task>.yaml``): official hyperparameters for
VTAB-1k and FGVC, CPU-sized ones for the offline tasks."""
from __future__ import annotations

from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def task_config(data: str, config: str | Path | None = None) -> dict:
    """The config for a data spec (``kind:path/task``), or an explicit YAML file; {} when none exists."""
    if config:
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found")
    else:
        kind, _, where = data.partition(":")
        path = CONFIG_DIR / kind / f"{Path(where).name}.yaml"
        if not path.is_file():
            return {}
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ValueError(f"config {path} is not valid YAML{where} ({getattr(e, 'problem', None) or e}); "
                         "fix the file") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"config {path} must be a YAML mapping (train:, num_classes:, ...), not a "
                         f"{type(cfg).__name__}")
    return cfg


def method_lr(task: dict, method: str) -> float | None:
    """A method's own learning rate for a task, when the config gives one."""
    return (task.get("method_lr") or {}).get(method)


def method_opts(task: dict, method: str) -> dict:
    """A method's own options for a task (``method_opts: {rlrr+pace: {sigma: 0.3}}``), tuned like its
    rate so a bench cell and a plain ``rlrr train`` on that task use the same ones; {} when none."""
    opts = (task.get("method_opts") or {}).get(method) or {}
    if not isinstance(opts, dict):
        raise ValueError(f"method_opts.{method} in the task config must be a mapping (key: value), not {opts!r}")
    return opts
