"""Learning-curve PNGs from a run's history (one panel for loss, one for accuracy)."""
from __future__ import annotations

from pathlib import Path

from ..files import figure, save_figure


def plot_history(history: list[dict], path: Path, title: str = "") -> None:
    fig, (ax_l, ax_a) = figure(1, 2, figsize=(10, 3.6))
    for phase in dict.fromkeys(r["phase"] for r in history):
        rows = [r for r in history if r["phase"] == phase]
        ep = [r["epoch"] for r in rows]
        ax_l.plot(ep, [r["train_loss"] for r in rows], label=f"{phase}: train")
        ax_a.plot(ep, [r["train_acc"] for r in rows], "--", label=f"{phase}: train")
        for split in ("val", "test"):
            if f"{split}_acc" in rows[0]:
                ax_l.plot(ep, [r[f"{split}_loss"] for r in rows], label=f"{phase}: {split}")
                ax_a.plot(ep, [r[f"{split}_acc"] for r in rows], label=f"{phase}: {split}")
    ax_l.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_a.set(xlabel="epoch", ylabel="top-1 (%)", title="accuracy")
    for ax in (ax_l, ax_a):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
