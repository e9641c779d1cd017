"""Hugging Face ``datasets`` as a data source: ``--data hfds:<hub id | folder>[:CONFIG][?image=COL&label=COL]``.

A folder is what ``save_to_disk`` writes (a DatasetDict or one Dataset) or parquet shards (the Hub's
``data/<split>-*.parquet`` layout); anything else is a Hub id, loaded by ``datasets.load_dataset`` (which
needs the network, or its cache).  The image column is the first ``Image`` feature and the label the first
``ClassLabel`` (else a column named label/labels/fine_label/...), unless the spec names them; a
``ClassLabel``'s names become the class names adapters and predictions carry.  Splits: VTAB-1k's
train800 / val200 / train800val200 / test when present, else train / validation / test, a missing val or
test held out of train as for folders.  Images stay undecoded in the dataset (``Image(decode=False)``) and
are opened by the project's reader, so modes, EXIF rotation and decompression bombs are handled as for files.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qsl

from torch.utils.data import Dataset

from ..extras import need
from .images import DataError, open_rgb


LABEL_NAMES = ("label", "labels", "fine_label", "class", "target", "y")
SPLIT_NAMES = {"train": ("train",), "val": ("validation", "val", "valid", "dev"), "test": ("test", "testing")}
VTAB_SPLITS = {"train": "train800", "val": "val200", "trainval": "train800val200", "test": "test"}


def parse_spec(where: str) -> tuple[str, str | None, dict[str, str]]:
    """``WHERE[:CONFIG][?image=COL&label=COL]`` as (where, config, column overrides)."""
    where, _, query = where.partition("?")
    options = dict(parse_qsl(query, keep_blank_values=True))
    bad = sorted(set(options) - {"image", "label"})
    if bad:
        raise DataError(f"hfds:{where}?{query}: unknown option {bad[0]!r}; name columns with image=COL and label=COL")
    if not Path(where).exists() and where.count(":") == 1:
        where, config = where.split(":")
        return where, config or None, options
    return where, None, options


def load(where: str, config: str | None):
    """The DatasetDict behind a spec: a ``save_to_disk`` folder, a folder of parquet shards, or a Hub id."""
    datasets = need("hf", "--data hfds:", "datasets")
    path = Path(where).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
        shards = sorted(path.rglob("*.parquet"))
        if not shards:
            raise DataError(f"hfds:{where} holds neither a save_to_disk dataset (dataset_dict.json / state.json) nor "
                            "parquet shards; point it at one of those folders")
        files: dict[str, list[str]] = {}
        for shard in shards:  # the Hub's layout: <split>-00000-of-00001.parquet or <split>/....parquet
            split = shard.name.split("-")[0].split(".")[0] if shard.parent == path or shard.parent.name == "data" \
                else shard.parent.name
            files.setdefault(split, []).append(str(shard))
        return datasets.load_dataset("parquet", data_files=files)
    try:
        return datasets.load_dataset(where, config)
    except Exception as e:  # noqa: BLE001 - offline, unknown id, gated: all say the same fix
        raise DataError(f"hfds:{where} could not be loaded from the Hugging Face Hub ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:100] if str(e) else ''}); where there is network, run python -c "
                        f"\"import datasets; datasets.load_dataset('{where}'{f', {config!r}' if config else ''})"
                        f".save_to_disk('DIR')\" and pass --data hfds:DIR") from None


def columns(ds, options: dict[str, str], where: str) -> tuple[str, str]:
    """(image column, label column) from the features, or as the spec names them."""
    from datasets import ClassLabel, Image
    feats = ds.features
    image = options.get("image") or next((k for k, f in feats.items() if isinstance(f, Image)), None)
    label = options.get("label") or next((k for k, f in feats.items() if isinstance(f, ClassLabel)), None) or \
        next((k for k in LABEL_NAMES if k in feats), None)
    for what, col in (("image", image), ("label", label)):
        if col is None or col not in feats:
            have = ", ".join(f"{k} ({type(f).__name__})" for k, f in feats.items())
            raise DataError(f"hfds:{where}: no {what} column{f' {col!r}' if col else ''} (columns: {have}); name it "
                            f"with ?{what}=COLUMN")
    return image, label


def hf_splits(where: str, seed: int) -> tuple[dict[str, list[tuple[int, int]]], dict[str, object],
                                              list[str] | None, int]:
    """(items per protocol split as (row, label) pairs, the HF split each reads, class names, class count).
    A missing val or test is held out of train by the folders' rule (``fill_splits``)."""
    spec, config, options = parse_spec(where)
    dd = load(spec, config)
    present = list(dd)
    if all(s in dd for s in ("train800", "val200", "test")):
        chosen = {k: v for k, v in VTAB_SPLITS.items() if v in dd}
    else:
        chosen = {s: next((n for n in names if n in dd), None) for s, names in SPLIT_NAMES.items()}
        chosen = {s: n for s, n in chosen.items() if n}
        if "train" not in chosen:
            raise DataError(f"hfds:{where} has splits {present}; training needs one named train (or VTAB-1k's "
                            "train800/val200/test)")
    from datasets import ClassLabel, Image
    first = dd[chosen["train"]]
    image, label = columns(first, options, where)
    feature = first.features[label]
    names = list(feature.names) if isinstance(feature, ClassLabel) else None
    raw = {s: dd[n][label] for s, n in chosen.items()}
    if names is None:
        values = sorted({v for labels in raw.values() for v in labels}, key=lambda v: (isinstance(v, str), v))
        if all(isinstance(v, int) for v in values):
            count = max(values) + 1
        else:  # string labels: sorted names, as ImageFolder's folder names
            names, count = [str(v) for v in values], len(values)
            index = {v: i for i, v in enumerate(values)}
            raw = {s: [index[v] for v in labels] for s, labels in raw.items()}
    count = len(names) if names else count
    items = {s: list(enumerate(labels)) for s, labels in raw.items()}
    tables = {s: dd[n].cast_column(image, Image(decode=False)) for s, n in chosen.items()}
    missing = [s for s in ("val", "test") if s not in items]
    if missing:
        from . import fill_splits
        carved = fill_splits(items, seed, f"hfds:{where}", "split", "train")
        for s in ("train", *missing):
            items[s], tables[s] = carved[s], tables["train"]
    if "trainval" not in items:
        if tables["val"] is tables["train"]:
            items["trainval"], tables["trainval"] = items["train"] + items["val"], tables["train"]
        else:
            from datasets import concatenate_datasets
            tables["trainval"] = concatenate_datasets([tables["train"], tables["val"]])
            items["trainval"] = items["train"] + [(len(tables["train"]) + i, y) for i, y in items["val"]]
    return items, {s: (t, image) for s, t in tables.items()}, names, count


class HFImages(Dataset):
    """Rows of an HF dataset split named by ``(row, label)`` pairs; each image decoded on access by the
    project's reader (``open_rgb``) from the row's bytes or path."""

    def __init__(self, table, image: str, items: list[tuple[int, int]], num_classes: int,
                 transform: Callable | None = None, name: str = "hfds"):
        bad = next(((row, y) for row, y in items if not 0 <= y < num_classes), None)
        if bad:
            raise DataError(f"{name}: row {bad[0]} has label {bad[1]}, outside 0..{num_classes - 1} (an unlabelled "
                            "split?); use a labelled split or set the number of classes")
        self.table, self.image, self.items, self.num_classes = table, image, items, num_classes
        self.transform, self.name = transform, name
        self.targets = [label for _, label in items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        row, label = self.items[i]
        cell = self.table[row][self.image]
        where = f"{self.name}[{row}]"
        if cell is None or (not cell.get("bytes") and not cell.get("path")):
            raise DataError(f"{where}: the row has no image; drop it from the dataset")
        img = open_rgb(io.BytesIO(cell["bytes"]) if cell.get("bytes") else Path(cell["path"]),
                       "drop or fix that row of the dataset", name=where)
        return (self.transform(img) if self.transform else img), label
