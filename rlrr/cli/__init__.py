"""The ``rlrr`` command line: train, eval, predict, merge, export, info, demo, pretrain, bench, sweep, serve,
analyze — a parser here and one module per command family (``train``, ``model``, ``grid``, ``serve``).

Every error a user can cause ends as one ``error: ...`` line and exit status 2; no torch traceback.
"""
from __future__ import annotations

import argparse
import os
import sys

from . import grid, model, serve, train


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line, like every other rlrr error."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="rlrr", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for family in (train, model, grid, serve):
        family.add_commands(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 is printed escaped, never a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a bad argument already said in one line
        return int(e.code or 0)
    from ..adapter import AdapterMismatchError
    from ..backbones import BackboneError
    from ..data.images import DataError
    from ..engine.trainer import TrainingStopped
    from ..methods.base import MergeError
    try:
        args.func(args)
    except KeyboardInterrupt:
        again = "; rerun with --resume to continue from the last checkpoint" if args.cmd == "train" else ""
        print(f"error: interrupted{again}", file=sys.stderr)
        return 130
    except (DataError, BackboneError, AdapterMismatchError, TrainingStopped, MergeError, FileNotFoundError,
            ValueError, TypeError, KeyError, RuntimeError, OSError) as e:
        if os.environ.get("RLRR_DEBUG"):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a bug of ours, said in one line with where to see more
        if os.environ.get("RLRR_DEBUG"):
            raise
        print(f"error: unexpected {type(e).__name__} in rlrr {args.cmd}: {one_line(e)} "
              "(RLRR_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2
    return 0


def one_line(e: BaseException) -> str:
    """The first line of an error's message; for an error re-raised from a DataLoader worker ("Caught
    DataError in DataLoader worker process 0" + the worker's traceback), the worker's own message."""
    text = str(e.args[0]) if isinstance(e, KeyError) and len(e.args) == 1 else str(e)  # KeyError quotes its text
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught ") and "Original Traceback" in text:
        return lines[-1].split(": ", 1)[-1]
    return lines[0] if lines else type(e).__name__
