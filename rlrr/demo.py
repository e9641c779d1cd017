"""``rlrr demo``: RLRR vs a linear probe on the embedded fractal-pretrained ViT and real handwritten
digits, fully offline on a CPU.  Both runs go through the same Trainer and the honest ``val``
protocol (epoch picked on val200, test evaluated once)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from timm.data import resolve_data_config
from torch.utils.data import DataLoader

from .backbones import EMBEDDED_NAME, create_backbone
from .data import build_data
from .engine.loop import evaluate
from .engine.experiment import run_experiment
from .files import atomic_write, figure, save_figure

METHODS = ("rlrr", "linear")


def run_demo(out: Path, quick: bool = False, task: str = "mnist") -> dict:
    """Both methods with their rates from rlrr/configs/offline/<task>.yaml; ``quick`` = a CI-sized schedule."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    base = create_backbone(EMBEDDED_NAME, weights="pretrained", num_classes=10)
    test = build_data(f"offline:{task}", resolve_data_config({}, model=base)).test
    if test.num_classes != 10:
        base.reset_classifier(test.num_classes)
    untrained = evaluate(base, DataLoader(test, 256), torch.device("cpu"))["acc"]
    short = {"epochs": 3, "warmup_epochs": 1} if quick else {}
    rows = []
    for method in METHODS:
        t0 = time.time()
        res = run_experiment(EMBEDDED_NAME, "pretrained", f"offline:{task}", out / method, method, protocol="val",
                             progress=not quick, verbose=False, overwrite=True, **short)  # a demo reruns
        rows.append({"method": method, "trainable_params": res["trainable_params"],
                     "method_params": res["method_params"], "val_acc": res["val_acc"], "test_acc": res["test_acc"],
                     "wall_s": round(time.time() - t0, 1), "lr": res["config"]["lr"], "epochs": res["config"]["epochs"]})
    result = {"task": task, "backbone": f"{EMBEDDED_NAME} (fractal-pretrained, shipped)",
              "protocol": "val: best epoch on val200, test once", "untrained_test_acc": untrained,
              "test_size": len(test), "rows": rows}
    atomic_write(out / "demo.json", lambda f: f.write(json.dumps(result, indent=1)), "w")
    _plot(out, list(METHODS))
    print(format_table(result))
    print(f"adapters: {out}/rlrr/adapter.safetensors; curves: {out}/curves.png")
    return result


def format_table(result: dict) -> str:
    lines = [f"task: {result['task']} | backbone: {result['backbone']} | {result['protocol']}",
             f"untrained (pretrained backbone, random head): test {result['untrained_test_acc']:.1f}%",
             f"{'method':<8}{'trainable':>11}{'val %':>8}{'test %':>8}{'wall s':>8}"]
    lines += [f"{r['method']:<8}{r['trainable_params']:>11,}{r['val_acc']:>8.1f}{r['test_acc']:>8.1f}{r['wall_s']:>8.1f}"
              for r in result["rows"]]
    return "\n".join(lines)


def _plot(out: Path, methods: list[str]) -> None:
    fig, ax = figure(figsize=(6, 3.6))
    for m in methods:
        hist = [json.loads(line) for line in (out / m / "metrics.jsonl").read_text().splitlines()]
        line, = ax.plot([r["epoch"] for r in hist], [r["val_acc"] for r in hist], marker="o", label=f"{m}: val200")
        ax.plot([r["epoch"] for r in hist], [r["train_acc"] for r in hist], "--", color=line.get_color(),
                label=f"{m}: train")
    ax.set(xlabel="epoch", ylabel="top-1 (%)", title="demo: RLRR vs linear probe")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "curves.png")
