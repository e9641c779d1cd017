"""``rlrr demo``: RLRR vs a linear probe on the embedded fractal-pretrained ViT and real handwritten
digits, fully offline on a CPU.  Both runs go through the same Trainer and the honest ``val``
protocol (epoch picked on val200, test evaluated once)."""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .backbones import EMBEDDED_NAME, create_backbone
from .data import build_data
from .engine.loop import evaluate
from .engine.trainer import TrainConfig, Trainer
from .methods.base import apply, make_config

# Per-method settings for the demo task (chosen on val200 of mnist; see configs/offline/).
DEMO_METHODS = {"rlrr": {"lr": 3e-3}, "linear": {"lr": 1e-2}}


def run_demo(out: Path, quick: bool = False, task: str = "mnist") -> dict:
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    out.mkdir(parents=True, exist_ok=True)
    base = create_backbone(EMBEDDED_NAME, weights="pretrained", num_classes=10)
    from timm.data import resolve_data_config
    splits = build_data(f"offline:{task}", resolve_data_config({}, model=base), seed=0)
    if splits.num_classes != 10:
        base.reset_classifier(splits.num_classes)
    epochs = 2 if quick else 15
    if quick:  # a CI-sized run: fewer test images, same code path
        splits.test = torch.utils.data.Subset(splits.test, range(500))
    rows = []
    torch.manual_seed(0)
    untrained = evaluate(base, DataLoader(splits.test, 256), torch.device("cpu"))["acc"]
    for name, opts in DEMO_METHODS.items():
        cfg = TrainConfig(epochs=epochs, warmup_epochs=1, batch_size=32, weight_decay=5e-5, protocol="val",
                          progress=not quick, **opts)
        mcfg = make_config(name)
        t0 = time.time()
        res = Trainer(lambda: apply(copy.deepcopy(base), mcfg), splits, cfg, out / name).fit()
        rows.append({"method": name, "trainable_params": res["trainable_params"],
                     "method_params": res["method_params"], "val_acc": res["val_acc"], "test_acc": res["test_acc"],
                     "wall_s": round(time.time() - t0, 1), "lr": opts["lr"]})
    result = {"task": task, "backbone": f"{EMBEDDED_NAME} (fractal-pretrained, shipped)", "epochs": epochs,
              "protocol": "val: best epoch on val200, test once", "untrained_test_acc": untrained,
              "test_size": len(splits.test), "rows": rows}
    (out / "demo.json").write_text(json.dumps(result, indent=1))
    _plot(out, list(DEMO_METHODS))
    print(format_table(result))
    return result


def format_table(result: dict) -> str:
    lines = [f"task: {result['task']} | backbone: {result['backbone']} | {result['protocol']}",
             f"untrained (pretrained backbone, random head): test {result['untrained_test_acc']:.1f}%",
             f"{'method':<8}{'trainable':>11}{'val %':>8}{'test %':>8}{'wall s':>8}"]
    lines += [f"{r['method']:<8}{r['trainable_params']:>11,}{r['val_acc']:>8.1f}{r['test_acc']:>8.1f}{r['wall_s']:>8.1f}"
              for r in result["rows"]]
    return "\n".join(lines)


def _plot(out: Path, methods: list[str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for m in methods:
        hist = [json.loads(line) for line in (out / m / "metrics.jsonl").read_text().splitlines()]
        ax.plot([r["epoch"] for r in hist], [r["val_acc"] for r in hist], marker="o", label=f"{m}: val200")
        ax.plot([r["epoch"] for r in hist], [r["train_acc"] for r in hist], "--", label=f"{m}: train")
    ax.set(xlabel="epoch", ylabel="top-1 (%)", title="demo: RLRR vs linear probe")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=90)
    plt.close(fig)
