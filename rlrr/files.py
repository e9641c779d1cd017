"""Writing files so that work is never lost, and locks that a killed process never leaves stuck: one
helper each, used for every output and every shared folder the project writes."""
from __future__ import annotations

import csv
import fcntl
import os
from pathlib import Path
from typing import IO, Callable


def atomic_write(path: str | Path, write: Callable[[IO], object], mode: str = "wb") -> Path:
    """Write through a temporary file of this process (``<name>.<pid>.tmp``), fsync, rename: a reader never
    sees half a file, a crash or a full disk mid-write leaves the previous file as it was (and no temp file
    behind), and two processes writing the same path at once each rename a whole file of their own."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        text = {"newline": "", "encoding": "utf-8", "errors": "surrogateescape"}  # file names: their own bytes
        with open(tmp, mode, **({} if "b" in mode else text)) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_csv(path: str | Path, rows: list[dict]) -> Path:
    """``rows`` as a CSV (columns: every key, in first-seen order), written atomically."""
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def write(f: IO) -> None:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)
    return atomic_write(path, write, "w")


def markdown_table(head: list[str], rows: list[list]) -> str:
    """A GitHub markdown table (the shape every table rlrr prints and writes); None cells are empty."""
    lines = ["| " + " | ".join(map(str, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


class FileLock:
    """An exclusive ``flock`` on ``path``, holding this process's pid.  The kernel drops it when the process
    ends however it ends (kill -9 included), so a lock is never stale: a held lock means a live holder.

    Re-entrant within one instance (a section may call code that takes the same lock), and usable where
    Optuna wants a journal lock (``acquire``/``release``).  ``blocking=False``: ``acquire`` returns False
    instead of waiting when another process holds it."""

    def __init__(self, path: str | Path, blocking: bool = True):
        self.path, self.blocking = Path(path).absolute(), blocking  # absolute: a later chdir cannot move it
        self.file: IO | None = None
        self.depth = 0

    def acquire(self) -> bool:
        if self.depth:
            self.depth += 1
            return True
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if self.blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            f.close()
            return False
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self.file, self.depth = f, 1
        return True

    def release(self) -> None:
        self.depth -= 1
        if self.depth == 0 and self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None

    def holder(self) -> str:
        """The pid the holder wrote (for messages), or '?'."""
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        if self.depth:
            self.release()


def lock_held(path: str | Path) -> bool:
    """Whether a live process holds the lock at ``path`` (this one too, through another ``FileLock``; a missing
    file: nobody does)."""
    if not Path(path).exists():
        return False
    probe = FileLock(path, blocking=False)
    if probe.acquire():
        probe.release()
        return False
    return True


def figure(*grid: int, figsize: tuple[float, float], **kwargs):
    """A matplotlib figure and its axes (as ``plt.subplots``), made without pyplot: no global backend is set
    and no figure is registered, so a caller's own matplotlib session is left as it was."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid, **kwargs)


def save_figure(fig, path: str | Path, dpi: int = 90) -> Path:
    """A figure as PNG, written atomically like every other output."""
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
