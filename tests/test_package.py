"""The package installs whole: a wheel built from this tree carries the configs, the published tables and
the embedded weights, and an installed (not editable) copy runs the mini bench with the same per-method
rates, to the same numbers, as this checkout."""
import csv
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True)
    return next(out.glob("rlrr-*.whl"))


def test_the_wheel_carries_every_file_the_code_reads(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = [p.relative_to(ROOT).as_posix() for folder in ("rlrr/configs", "rlrr/weights") for p in
               (ROOT / folder).rglob("*") if p.is_file()]
    assert len(shipped) > 30 and not [n for n in shipped if n not in names]
    assert {"rlrr/configs/vtab1k/dtd.yaml", "rlrr/configs/offline/mnist.yaml", "rlrr/configs/published/vtab1k.csv",
            "rlrr/weights/vit_pico_patch4_32.fractal.safetensors",
            "rlrr/weights/vit_pico_patch4_32.fractal1k.safetensors"} <= names  # the demo's and the proxy's backbones


def test_an_installed_wheel_reproduces_the_checkouts_smoke_bench(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import rlrr; print(rlrr.__file__)"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(site)), where  # the installed copy, not this checkout
    rows = {}
    for name, extra in (("installed", env), ("checkout", None)):
        out = tmp_path / name
        subprocess.run([sys.executable, "-m", "rlrr.cli", "bench", "--suite", "mini", "--smoke", "--methods",
                        "rlrr,linear", "--output", str(out)], cwd=tmp_path if extra else ROOT, env=extra,
                       check=True, capture_output=True)
        with open(out / "results.csv") as f:
            rows[name] = [{k: r[k] for k in ("task", "method", "test_acc", "val_acc", "trainable_params")}
                          for r in csv.DictReader(f)]
        lrs = {m: json.loads((out / "mnist" / m / "seed0" / "summary.json").read_text())["config"]["lr"]
               for m in ("rlrr", "linear")}
        rows[name].append(lrs)
    assert rows["installed"] == rows["checkout"]
    assert rows["checkout"][-1]["rlrr"] != rows["checkout"][-1]["linear"]  # each method's own rate from the config


def test_a_known_task_without_its_config_is_an_error_not_a_default(monkeypatch, tmp_path):
    from rlrr import config
    monkeypatch.setattr(config, "CONFIG_DIR", tmp_path)  # an install that lost its configs
    with pytest.raises(FileNotFoundError, match="config of vtab1k task dtd .* is missing from the installed rlrr"):
        config.task_config("vtab1k:/data/dtd")
    assert config.task_config("folder:/data/my_pets") == {}  # a task of the user's own has none: defaults
