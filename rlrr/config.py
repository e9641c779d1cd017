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
    return yaml.safe_load(path.read_text()) or {}


def method_lr(task: dict, method: str) -> float | None:
    """A method's own learning rate for a task, when the config gives one."""
    return (task.get("method_lr") or {}).get(method)
