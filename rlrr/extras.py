"""Optional dependency groups: one way to import what an extra provides and, where it is missing, one line
naming the install (``pip install 'rlrr[serve]'``), whichever feature asked."""
from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(RuntimeError):
    """A feature's optional dependency group is not installed."""


def need(extra: str, what: str, *modules: str) -> ModuleType:
    """Import ``modules`` (the first is returned) of the optional group ``extra`` for the feature ``what``,
    or raise one line naming the group to install."""
    try:
        loaded = [importlib.import_module(m) for m in modules]
    except ImportError as e:
        raise MissingExtra(f"{what} needs the {extra} extra ({e.name} is not installed); "
                           f"pip install 'rlrr[{extra}]'") from None
    return loaded[0]
