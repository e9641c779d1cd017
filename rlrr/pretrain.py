"""Formula-driven pre-training of the embedded backbone (``rlrr pretrain``).

Supervised classification of fractal classes (FractalDB-style) with full training of a small ViT.
The shipped checkpoint ``rlrr/weights/vit_pico_patch4_32.fractal.safetensors`` was produced by the
defaults below; its log sits beside it.  The classifier head is dropped: it only knows fractals.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, random_split

from .backbones import EMBEDDED_NAME, create_backbone
from .data.synthetic import FractalDataset
from .engine.loop import StepConfig, evaluate, train_one_epoch
from .engine.optim import build_optimizer, build_scheduler


@dataclass
class PretrainConfig:
    model: str = EMBEDDED_NAME
    classes: int = 100
    per_class: int = 200
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    label_smoothing: float = 0.1
    seed: int = 0


def pretrain(cfg: PretrainConfig, output: Path, progress: bool = True) -> dict:
    """Pre-train and write ``<output>/<model>.fractal.safetensors`` (fp16, no head) plus a JSON log."""
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    data = FractalDataset(cfg.classes, cfg.per_class, seed=cfg.seed)
    n_val = len(data) // 20
    train, val = random_split(data, [len(data) - n_val, n_val], generator=torch.Generator().manual_seed(cfg.seed))
    gen_s = time.time() - t0
    train_dl = DataLoader(train, cfg.batch_size, shuffle=True, drop_last=True,
                          generator=torch.Generator().manual_seed(cfg.seed))
    val_dl = DataLoader(val, 256)
    model = create_backbone(cfg.model, weights=None, num_classes=cfg.classes)
    opt = build_optimizer(model, cfg.lr, cfg.weight_decay)
    sched = build_scheduler(opt, cfg.epochs * len(train_dl), cfg.warmup_epochs * len(train_dl))
    device, log = torch.device("cpu"), []
    for epoch in range(cfg.epochs):
        stats = train_one_epoch(model, train_dl, opt, sched, StepConfig(label_smoothing=cfg.label_smoothing),
                                device, epoch, progress=progress)
        stats.update({f"val_{k}": v for k, v in evaluate(model, val_dl, device).items()},
                     epoch=epoch, elapsed_s=round(time.time() - t0, 1))
        log.append(stats)
        print(json.dumps(stats), flush=True)
    sd = {k: v.half().contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}
    path = output / f"{cfg.model}.fractal.safetensors"
    save_file(sd, str(path), metadata={"recipe": json.dumps(asdict(cfg))})
    result = {"config": asdict(cfg), "data_generation_s": round(gen_s, 1), "log": log,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "file": path.name}
    (output / f"{cfg.model}.fractal.log.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    pretrain(PretrainConfig(), Path("rlrr/weights"))
