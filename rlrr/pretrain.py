"""Formula-driven pre-training of the embedded backbone (``rlrr pretrain``).

Supervised classification of fractal classes (FractalDB-style) with full training of a small ViT.
The shipped checkpoint ``rlrr/weights/vit_pico_patch4_32.fractal.safetensors`` was produced by the
defaults below; its log sits beside it.  The classifier head is dropped: it only knows fractals.
The data live on the training device as uint8 and batches are cut from them there, so a GPU is not
kept waiting on a Python data loader (FractalDB-1k scale: ``--classes 1000 --device cuda --workers 16``).

A pre-training that takes hours can be spread over several runs: every epoch ends in a checkpoint
(``<model>.fractal.checkpoint.pt``: weights, optimiser, schedule, the data order's and torch's random
state, the log), written atomically, and the same command run again continues from it, so a run killed
at any point (kill -9 included) and rerun writes the same weights as one that never stopped.  A
checkpoint of other settings is refused by name; a finished pre-training is only read back.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save

from .backbones import EMBEDDED_NAME, create_backbone
from .data.synthetic import fractal_images
from .engine.distributed import setup
from .engine.loop import StepConfig, evaluate, train_one_epoch
from .engine.optim import build_optimizer, build_scheduler
from .files import FileLock, atomic_write


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
    rotate: bool = True  # renderings turned at random (the shipped recipe) or kept upright


class Batches:
    """Shuffled batches cut from images held on the device (uint8, N×H×W): what a DataLoader over them
    would yield, normalised to [-1, 1] and 3 channels, without a Python call per image.  ``order``
    (a CPU generator) fixes the shuffle and is saved with each checkpoint."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 order: torch.Generator | None = None):
        self.images, self.labels, self.batch_size, self.order = images, labels, batch_size, order

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.order is not None else -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.labels)
        idx = torch.randperm(n, generator=self.order) if self.order is not None else torch.arange(n)
        for i in range(len(self)):
            j = idx[i * self.batch_size:(i + 1) * self.batch_size].to(self.images.device)
            x = self.images[j].float().div(127.5).sub(1.0).unsqueeze(1).expand(-1, 3, -1, -1)
            yield x, self.labels[j]


def pretrain(cfg: PretrainConfig, output: Path, progress: bool = True, device: str = "auto",
             workers: int = 1) -> dict:
    """Pre-train (or continue a pre-training in ``output``) and write ``<output>/<model>.fractal.safetensors``
    (fp16, no head) plus a JSON log.  ``device`` and ``workers`` (processes rendering the data) change
    how fast, not what: a pre-training may continue on another device."""
    output.mkdir(parents=True, exist_ok=True)
    path, ckpt = output / f"{cfg.model}.fractal.safetensors", output / f"{cfg.model}.fractal.checkpoint.pt"
    lock = FileLock(output / f".{cfg.model}.pretrain.lock", blocking=False)
    if not lock.acquire():
        raise RuntimeError(f"{output} is in use by another rlrr pretrain (pid {lock.holder()}); wait for it to end "
                           "or pass another --output")
    try:
        return _pretrain(cfg, output, path, ckpt, progress, setup(device)[2], workers)
    finally:
        lock.release()


def _pretrain(cfg: PretrainConfig, output: Path, path: Path, ckpt: Path, progress: bool, device: torch.device,
              workers: int) -> dict:
    state = _read_checkpoint(ckpt, cfg)
    log_path = output / f"{cfg.model}.fractal.log.json"
    if state is not None and state["epoch"] == cfg.epochs and path.is_file() and log_path.is_file():
        print(f"pre-training in {output} is finished ({cfg.epochs} epochs); delete {ckpt.name} to run it again")
        return json.loads(log_path.read_text())
    n = cfg.classes * cfg.per_class
    if cfg.batch_size > n - n // 20:  # before rendering, which takes minutes at FractalDB-1k scale
        raise ValueError(f"--batch-size {cfg.batch_size} is more than the {n - n // 20} training images; pass a smaller "
                         "one or more --classes / --per-class")
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    images, labels = (torch.from_numpy(a).to(device) for a in
                      fractal_images(cfg.classes, cfg.per_class, seed=cfg.seed, rotate=cfg.rotate, workers=workers))
    split = torch.randperm(len(labels), generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    val, train = split[:n // 20], split[n // 20:]
    gen_s = time.time() - t0
    order = torch.Generator().manual_seed(cfg.seed)  # the data order: advances each epoch, saved with each checkpoint
    train_dl = Batches(images[train], labels[train], cfg.batch_size, order)
    val_dl = Batches(images[val], labels[val], 256)
    model = create_backbone(cfg.model, weights=None, num_classes=cfg.classes).to(device)
    opt = build_optimizer(model, cfg.lr, cfg.weight_decay)
    sched = build_scheduler(opt, cfg.epochs * len(train_dl), cfg.warmup_epochs * len(train_dl))
    log, start, spent = [], 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])  # onto the parameters' device, wherever it was saved
        sched.load_state_dict(state["sched"])
        order.set_state(state["order"])
        torch.set_rng_state(state["rng"])
        log, start, spent = json.loads(state["log"]), state["epoch"], state["elapsed_s"]
        print(f"continuing the pre-training in {output} after epoch {start - 1} of {cfg.epochs}", flush=True)
    t0 = time.time() - spent
    for epoch in range(start, cfg.epochs):
        stats = train_one_epoch(model, train_dl, opt, sched, StepConfig(label_smoothing=cfg.label_smoothing),
                                device, epoch, progress=progress)
        stats.update({f"val_{k}": v for k, v in evaluate(model, val_dl, device).items()},
                     epoch=epoch, elapsed_s=round(time.time() - t0, 1))
        log.append(stats)
        print(json.dumps(stats), flush=True)
        atomic_write(ckpt, lambda f: torch.save(
            {"config": json.dumps(asdict(cfg)), "epoch": epoch + 1, "model": model.state_dict(),
             "optim": opt.state_dict(), "sched": sched.state_dict(), "order": order.get_state(),
             "rng": torch.get_rng_state(), "log": json.dumps(log), "elapsed_s": time.time() - t0}, f))
    sd = {k: v.half().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}
    blob = save(sd, metadata={"recipe": json.dumps(asdict(cfg))})
    atomic_write(path, lambda f: f.write(blob))
    result = {"config": asdict(cfg), "data_generation_s": round(gen_s, 1), "log": log,
              "torch": torch.__version__, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else f"cpu ({torch.get_num_threads()} threads)", "file": path.name}
    atomic_write(log_path, lambda f: f.write(json.dumps(result, indent=1)), "w")
    return result


def _read_checkpoint(ckpt: Path, cfg: PretrainConfig) -> dict | None:
    """The checkpoint to continue from (None: start), refusing one that is unreadable or of other settings."""
    if not ckpt.is_file():
        return None
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        was = {**asdict(PretrainConfig()), **json.loads(state["config"])}  # settings added since: their defaults
    except Exception as e:  # noqa: BLE001 - truncated, foreign or pickled-code files all mean the same
        raise RuntimeError(f"{ckpt} is not a readable pre-training checkpoint ({type(e).__name__}); delete it to "
                           "start over") from None
    if was != asdict(cfg):
        diff = ", ".join(f"{k}={v!r} (now {asdict(cfg)[k]!r})" for k, v in was.items() if asdict(cfg).get(k) != v)
        raise RuntimeError(f"{ckpt} continues a pre-training with {diff}; run with the same settings, or delete it "
                           "(or pass another --output) to start another")
    return state


if __name__ == "__main__":
    pretrain(PretrainConfig(), Path("rlrr/weights"))
