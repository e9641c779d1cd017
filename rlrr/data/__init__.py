"""Datasets behind one spec string: ``vtab1k:<root>/<task>``, ``fgvc:<root>/<name>``, ``folder:<dir>``,
``csv:<file>`` or ``offline:<task>``; each gives train / val / trainval / test splits and a class count."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from .benchmarks import VTAB, fgvc_items, vtab_items
from .images import DataError, ImageList, csv_list, image_folder, warn_near_twins
from .offline import TASKS as OFFLINE_TASKS, offline_splits, parse_task
from .transforms import eval_transform, train_transform

log = logging.getLogger(__name__)


@dataclass
class Splits:
    name: str
    train: Dataset
    val: Dataset
    trainval: Dataset
    test: Dataset
    num_classes: int
    class_names: list[str] | None = None  # by class id, where the layout names them (folder names)

    def __post_init__(self) -> None:
        self.class_names = self.class_names or [str(i) for i in range(self.num_classes)]

    def __getitem__(self, split: str) -> Dataset:
        return getattr(self, split)


def _holdout(items: list, seed: int, val_frac: float = 0.2, test_frac: float = 0.2) -> dict[str, list]:
    """Disjoint seeded train / val / test split for layouts that come without one."""
    perm = np.random.default_rng(seed).permutation(len(items))
    n_test, n_val = int(len(items) * test_frac), int(len(items) * val_frac)
    pick = lambda idx: [items[i] for i in idx]  # noqa: E731
    test, val, train = pick(perm[:n_test]), pick(perm[n_test:n_test + n_val]), pick(perm[n_test + n_val:])
    return {"train": train, "val": val, "trainval": train + val, "test": test}


def fill_splits(given: dict[str, list], seed: int, where: str, kind: str, source: str) -> dict[str, list]:
    """``given`` (train, and val / test where the data has them) with each missing one held out of train (20%,
    seeded) and said in a warning: folders and HF datasets alike ("``where``: no val ``kind``; held out 20% of
    ``source`` as val")."""
    missing = [s for s in ("val", "test") if s not in given]
    if missing:
        log.warning("%s: no %s %s; held out 20%% of %s as %s (seed %d)", where, " or ".join(missing), kind, source,
                    " and 20% as ".join(missing), seed)
    carved = _holdout(given["train"], seed, *(0.2 if s in missing else 0.0 for s in ("val", "test")))
    return {**carved, **{s: given[s] for s in ("val", "test") if s in given}}


SPLIT_FOLDERS = {"train": ("train", "training"), "val": ("val", "valid", "validation", "dev"), "test": ("test", "testing")}


def folder_items(root: Path, seed: int) -> tuple[dict[str, list], list[str]]:
    """``folder:DIR`` splits.  Class folders straight in DIR: a seeded 60/20/20 split.  Split folders
    (``train/`` and any of ``val/``, ``test/``, each an ImageFolder; the layout most datasets ship in): used as
    given, with class ids from ``train/``'s folder names and whichever of val/test is missing held out of
    train (20%, seeded, said in a warning); reading the splits as three classes would train nonsense silently."""
    subs = {d.name.lower(): d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")} \
        if root.is_dir() else {}
    dirs = {split: next(subs[a] for a in aliases if a in subs) for split, aliases in SPLIT_FOLDERS.items()
            if any(a in subs for a in aliases)}
    if "train" not in dirs:
        all_items, names = image_folder(root)
        warn_near_twins(str(root), names)
        return _holdout(all_items, seed), names
    aliases = {a for names in SPLIT_FOLDERS.values() for a in names}
    others = sorted(d.name for name, d in subs.items() if name not in aliases)
    if others:
        raise DataError(f"folder {root} mixes split folders ({', '.join(d.name for d in dirs.values())}) with "
                        f"{others[0]!r}; put the class folders inside the split folders, or only class folders in {root}")
    given, names = {}, None
    for split, folder in dirs.items():  # train first: its folders name the classes
        items, classes = image_folder(folder)
        names = names or classes
        index = {c: i for i, c in enumerate(names)}
        unknown = [c for c in classes if c not in index]
        if unknown:
            raise DataError(f"{folder / unknown[0]}: class {unknown[0]!r} has no folder in {dirs['train']}; every "
                            "class needs training images: add them or remove the folder")
        given[split] = [(p, index[classes[i]]) for p, i in items]
    warn_near_twins(str(dirs["train"]), names)  # once: train's folders name the classes
    splits = fill_splits(given, seed, f"folder {root}", "folder", f"{dirs['train'].name}/")
    splits["trainval"] = splits["train"] + splits["val"]
    return splits, names


def check_class_count(spec: str, n: int, asked: int | None, inferred: bool) -> None:
    """``--num-classes`` must match a dataset that knows its classes; where the count is only inferred from
    the largest label seen (CSV, a VTAB-layout folder of another name) it may add classes, never drop them."""
    if asked is None or asked == n or (inferred and asked > n):
        return
    known = f"its labels reach {n - 1}" if inferred else f"it has {n} classes"
    raise DataError(f"{spec}: --num-classes {asked} does not fit the data ({known}); drop the flag or fix it")


def warn_repeats(spec: str, items: dict[str, list]) -> None:
    """Warn, with counts, about images listed twice in one split and test images also listed for training:
    both go unnoticed otherwise and inflate or leak the reported accuracy."""
    for split in ("train", "val", "test"):
        paths = [p for p, _ in items.get(split, [])]
        if len(set(paths)) < len(paths):
            log.warning("%s: %d image(s) listed more than once in the %s split", spec,
                        len(paths) - len(set(paths)), split)
    test = {p for p, _ in items.get("test", [])}
    leaked = {p for split in ("train", "val", "trainval") for p, _ in items.get(split, []) if p in test}
    if leaked:
        log.warning("%s: %d test image(s) are also in the training lists (train/val), e.g. %s; the test "
                    "accuracy is not held out", spec, len(leaked), sorted(leaked)[0])


def build_data(spec: str, data_cfg: dict, kind_aug: str | None = None, seed: int = 0, skip_bad: bool = False,
               num_classes: int | None = None) -> Splits:
    """Parse a data spec and build its splits with transforms from the backbone's ``data_cfg``
    (timm ``resolve_data_config``: input_size, mean, std, interpolation, crop_pct)."""
    kind, sep, where = spec.partition(":")
    if not sep:
        raise DataError(f"data spec {spec!r} needs a kind: vtab1k:ROOT/TASK, fgvc:ROOT/NAME, folder:DIR, "
                        "csv:FILE, hfds:DATASET or offline:TASK[:N]")
    size = data_cfg["input_size"][-1]
    names = None
    inferred = kind == "vtab1k" and Path(where).name not in VTAB  # counted from the labels seen (CSV ids: below)
    if kind == "offline":
        task, n_train = parse_task(where)
        parts = offline_splits(task, size, data_cfg["mean"], data_cfg["std"], seed=seed, n_train=n_train)
        n = parts["train"].num_classes
    else:
        path = Path(where).expanduser()
        if kind == "vtab1k":
            items, n = vtab_items(path)
            aug = kind_aug or "none"
        elif kind == "fgvc":
            items, n = fgvc_items(path)
            aug = kind_aug or "fgvc"
        elif kind == "folder":
            (items, names), aug = folder_items(path, seed), kind_aug or "fgvc"
            n = len(names)
        elif kind == "hfds":
            from .hfds import hf_splits
            items, tables, names, n = hf_splits(where, seed)
            inferred, aug = names is None, kind_aug or "fgvc"
        elif kind == "csv":
            all_items, names = csv_list(path)
            inferred = names is None
            n = len(names) if names else max((label for _, label in all_items), default=-1) + 1
            items, aug = _holdout(all_items, seed), kind_aug or "fgvc"
        else:
            raise DataError(f"unknown data kind {kind!r}; use vtab1k, fgvc, folder, csv, hfds or offline")
        check_class_count(spec, n, num_classes, inferred)
        n = num_classes or n
        if n < 2:  # 100% of one class measures nothing: usually --data points one folder too deep or too high
            fix = "point --data at the folder holding one sub-folder per class" if kind == "folder" else "check the labels"
            raise DataError(f"{spec}: the data has one class ({names[0] if names else 'label 0'}); a classifier needs "
                            f"two or more: {fix}")
        tf = {"train": train_transform(data_cfg, aug), "eval": eval_transform(data_cfg, aug)}
        pick = {s: tf["train" if s in ("train", "trainval") else "eval"] for s in items}
        if kind == "hfds":
            from .hfds import HFImages
            parts = {s: HFImages(*tables[s], v, n, pick[s], f"{spec}/{s}") for s, v in items.items()}
        else:
            warn_repeats(spec, items)
            parts = {s: ImageList(v, n, pick[s], skip_bad, f"{path.name}/{s}") for s, v in items.items()}
    if kind == "offline":
        check_class_count(spec, n, num_classes, False)
    empty = [s for s in ("train", "val", "test") if len(parts[s]) == 0]
    if empty:
        raise DataError(f"{spec}: the {empty[0]} split has no images; training selects on val and reports test, "
                        "so each split needs some")
    return Splits(where.rstrip("/").rsplit("/", 1)[-1], parts["train"], parts["val"], parts["trainval"],
                  parts["test"], n, names if names and len(names) == n else None)


__all__ = ["DataError", "OFFLINE_TASKS", "Splits", "VTAB", "build_data"]
