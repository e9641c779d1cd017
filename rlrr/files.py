"""Writing files so that work is never lost: one helper, used for every output the project writes."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import IO, Callable


def atomic_write(path: str | Path, write: Callable[[IO], object], mode: str = "wb") -> Path:
    """Write through ``path.tmp``, fsync, rename: a reader never sees half a file, and a crash or a full
    disk mid-write leaves the previous file as it was (and no temp file behind)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"newline": "", "encoding": "utf-8"})) as f:
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
