"""One epoch of training and one pass of evaluation; method-agnostic (only ``requires_grad`` matters)."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..backbones.hf import logits_of
from ..methods.base import cross_entropy


class NonFiniteLoss(RuntimeError):
    """Raised when the loss becomes NaN/inf; the trainer keeps the last good checkpoint."""


@dataclass
class StepConfig:
    amp: str = "none"  # "none", "bf16" or "fp16" (fp16 only on CUDA, with a grad scaler)
    grad_accum: int = 1
    clip_grad: float | None = None
    label_smoothing: float = 0.0


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs CUDA; use --amp bf16 on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def train_one_epoch(model: torch.nn.Module, loader, optimizer: torch.optim.Optimizer, scheduler, cfg: StepConfig,
                    device: torch.device, epoch: int, scaler: torch.amp.GradScaler | None = None,
                    progress: bool = True, objective: Callable = cross_entropy) -> dict[str, float]:
    """Train for one epoch; returns mean loss and accuracy. ``scheduler.step_update`` gets the global step.

    ``objective(model, x, y, label_smoothing) -> (loss, logits)``: cross-entropy, or a method's own
    (PACE's consistency term), so AMP, accumulation, clipping and the NaN check stay here, once."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    steps_per_epoch = math.ceil(len(loader) / cfg.grad_accum)
    total_loss, correct, seen = 0.0, 0, 0
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=None if progress else True)
    for i, (x, y) in enumerate(bar):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, cfg.amp):
            loss, logits = objective(model, x, y, cfg.label_smoothing)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"loss is {loss.item()} at epoch {epoch}, batch {i}; lower --lr, "
                                "use --clip-grad or --amp none")
        (scaler.scale(loss) if scaler else loss).div(cfg.grad_accum).backward()
        last = (i + 1) == len(loader)
        if (i + 1) % cfg.grad_accum == 0 or last:
            if scaler:
                scaler.unscale_(optimizer)
            if cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step_update(epoch * steps_per_epoch + (i // cfg.grad_accum) + 1)
        total_loss += loss.item() * len(y)
        correct += (logits.argmax(-1) == y).sum().item()
        seen += len(y)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}")
    return {"train_loss": total_loss / max(seen, 1), "train_acc": 100.0 * correct / max(seen, 1)}


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, amp: str = "none",
             progress: bool = False) -> dict[str, float]:
    """Top-1 accuracy (%) and mean loss over a loader."""
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in tqdm(loader, desc="eval", leave=False, disable=None if progress else True):
        x, y = x.to(device), y.to(device)
        with autocast(device, amp):
            logits = logits_of(model(x)).float()
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
        seen += len(y)
    return {"loss": total_loss / max(seen, 1), "acc": 100.0 * correct / max(seen, 1)}
