"""The package version, in a module of its own so that code inside the package reads it without importing
the package root (no arrow runs back up the import graph), and the code commit a result was made with."""
from __future__ import annotations

import functools
import subprocess
from pathlib import Path

__version__ = "0.1.0"


@functools.cache
def code_commit() -> str:
    """The git commit of the source tree this package runs from (``+dirty`` with uncommitted changes), or
    ``rlrr <version>`` for an installed wheel: what every result records, so that a table row names the code
    that made it and a re-run of a cell can be checked out at that commit."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return f"rlrr {__version__}"
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "rlrr"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"rlrr {__version__}"
    return head + ("+dirty" if dirty else "")
