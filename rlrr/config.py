"""Checked-in per-task configs (``rlrr/configs/<kind>/<task>.yaml``): official hyperparameters for
VTAB-1k and FGVC, CPU-sized ones for the offline tasks; the YAML reading and the type checks that every
user-written value (config files, ``--method-opt``, ``--pace``, adapter metadata) goes through."""
from __future__ import annotations

import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml


class Loader(yaml.SafeLoader):
    """YAML as a user writes numbers: PyYAML follows YAML 1.1, where ``1e-3`` (no dot) and ``nan`` are
    strings; here every number a person writes (1e-3, 1E-3, .5, 5., nan, inf, -inf) is a float."""


Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*\.?[\d_]*(?:[eE][-+]?\d+)?|\.\d[\d_]*(?:[eE][-+]?\d+)?|\.?inf|\.?nan)$",
               re.IGNORECASE),
    list("-+0123456789.iInN"))


def load_yaml(text: str, where: str, lines: bool = True) -> Any:
    """``text`` parsed by ``Loader``; a syntax error names ``where`` (a file, a flag) and, for a file
    (``lines``), the line."""
    try:
        return yaml.load(text, Loader=Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark and lines else ""
        raise ValueError(f"{where} is not valid YAML{at} ({getattr(e, 'problem', None) or e}); fix it") from None


def describe(hint: Any) -> str:
    """A type hint in words, for error messages."""
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}
    if hint in words:
        return words[hint]
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) in (tuple, list):
        return f"a list of {describe(typing.get_args(hint)[0]).split(' ', 1)[-1]}s"
    return getattr(hint, "__name__", str(hint))


def fit(value: Any, hint: Any) -> Any:
    """``value`` as type ``hint`` (an int for a float, a list for a tuple), or TypeError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return value
    if origin in (Union, types.UnionType):
        for a in args:
            try:
                return fit(value, a)
            except TypeError:
                pass
        raise TypeError
    if origin in (tuple, list) and isinstance(value, (tuple, list)):
        return origin(fit(v, args[0]) for v in value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(hint, type) and hint not in (int, float) and isinstance(value, hint):
        return value
    if origin is not None and not args:
        return value
    if origin is not None and isinstance(value, origin):
        return value
    raise TypeError


def check_fields(cls: type, values: dict, where: str) -> dict:
    """``values`` for dataclass ``cls`` with every known key's value fitted to its type hint; a value of
    the wrong type is a one-line error naming the key and ``where`` it was written."""
    hints = typing.get_type_hints(cls)
    out = dict(values)
    for key, value in values.items():
        if key in hints and typing.get_origin(hints[key]) is not typing.ClassVar:
            try:
                out[key] = fit(value, hints[key])
            except TypeError:
                raise TypeError(f"{where}: {key} must be {describe(hints[key])}, not {value!r}") from None
    return out

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # package data: a wheel carries it


def task_config_path(data: str, config: str | Path | None = None) -> Path | None:
    """The task YAML a run reads: ``config`` when given (it must exist), else the checked-in
    ``rlrr/configs/<kind>/<task>.yaml`` of the data spec when there is one."""
    if config:
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found")
        return path
    kind, _, where = data.partition(":")
    if kind == "offline":  # offline:TASK:N is TASK on N training images: the same task, the same config
        where = where.partition(":")[0]
    path = CONFIG_DIR / kind / f"{Path(where).name}.yaml"
    if path.is_file():
        return path
    if Path(where).name in known_tasks(kind):  # the package ships one: without it every value would be a default
        raise FileNotFoundError(f"the config of {kind} task {Path(where).name} ({path}) is missing from the installed "
                                "rlrr; reinstall it (pip install --force-reinstall rlrr) or pass --config FILE")
    return None


def known_tasks(kind: str) -> tuple[str, ...]:
    """The tasks the package ships a config for, by data kind."""
    from .data.benchmarks import FGVC, VTAB
    from .data.offline import TASKS
    return {"vtab1k": tuple(VTAB), "fgvc": tuple(FGVC), "offline": TASKS}.get(kind, ())


def task_config(data: str, config: str | Path | None = None) -> dict:
    """The config for a data spec (``kind:path/task``), or an explicit YAML file; {} when none exists."""
    path = task_config_path(data, config)
    if path is None:
        return {}
    cfg = load_yaml(path.read_text(), f"config {path}") or {}
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


def flat(values: dict, prefix: str = "") -> dict:
    """Nested option dicts as one level of dotted keys, JSON-normalised (tuples and lists compare alike): how a
    finished cell's settings are compared, and what a tracker's flat parameter list takes."""
    if not prefix:
        values = json.loads(json.dumps(values))  # once, at the top: nested dicts are already plain
    out = {}
    for k, v in values.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out
