"""Hugging Face datasets as a data source (``--data hfds:``): datasets the tests build and save with the
``datasets`` library itself (save_to_disk and parquet shards), read back through the project's image reader."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from rlrr.adapter import Adapter
from rlrr.cli import main
from rlrr.data import DataError, build_data

datasets = pytest.importorskip("datasets")
CFG = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear", "crop_pct": 1.0}
NAMES = ["circle", "square", "bar"]


def shape(kind: int, rng) -> Image.Image:
    a = np.zeros((32, 32), np.uint8)
    c = rng.integers(8, 24, size=2)
    if kind == 0:
        yy, xx = np.mgrid[:32, :32]
        a[(yy - c[0]) ** 2 + (xx - c[1]) ** 2 < 36] = 255
    elif kind == 1:
        a[c[0] - 5:c[0] + 5, c[1] - 5:c[1] + 5] = 255
    else:
        a[c[0] - 1:c[0] + 1, 4:28] = 255
    return Image.fromarray(a)


def build(splits: dict[str, int], seed: int = 0):
    rng = np.random.default_rng(seed)
    feats = datasets.Features({"img": datasets.Image(), "fine": datasets.ClassLabel(names=NAMES),
                               "note": datasets.Value("string")})
    parts = {}
    for split, n in splits.items():
        labels = [i % 3 for i in range(n)]
        parts[split] = datasets.Dataset.from_dict({"img": [shape(y, rng) for y in labels], "fine": labels,
                                                   "note": ["x"] * n}, features=feats)
    return datasets.DatasetDict(parts)


def test_a_saved_dataset_trains_and_its_classlabel_names_reach_the_adapter(tmp_path, caplog):
    folder = tmp_path / "shapes"
    build({"train": 60, "test": 30}).save_to_disk(str(folder))
    splits = build_data(f"hfds:{folder}", CFG, seed=0)
    assert splits.class_names == NAMES and splits.num_classes == 3
    assert (len(splits.train), len(splits.val), len(splits.test)) == (48, 12, 30)  # val held out of train, said
    assert "no val split; held out 20% of train as val" in caplog.text
    x, y = splits.test[4]
    assert tuple(x.shape) == (3, 32, 32) and y == 4 % 3
    out = tmp_path / "run"
    assert main(["train", "--data", f"hfds:{folder}", "--method", "linear", "--epochs", "1", "--output", str(out),
                 "--no-progress"]) == 0
    assert Adapter.read(out / "adapter.safetensors").class_names(3) == NAMES
    assert json.loads((out / "summary.json").read_text())["num_classes"] == 3


def test_parquet_shards_and_vtab_split_names_are_read_the_same(tmp_path):
    dd = build({"train800": 24, "val200": 9, "test": 12})
    folder = tmp_path / "vtabish"
    for split, ds in dd.items():
        ds.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    splits = build_data(f"hfds:{folder}", CFG, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.trainval), len(splits.test)) == (24, 9, 33, 12)
    assert splits.class_names == NAMES  # the ClassLabel survives the parquet round trip
    row, label = splits.trainval.items[24 + 3]  # trainval = train800 then val200 (row 3 of val200)
    assert label == splits.val.items[3][1] and splits.trainval.table[row]["img"] == splits.val.table[3]["img"]


def test_columns_are_overridable_and_bad_rows_are_named(tmp_path):
    import torch
    rng = np.random.default_rng(1)
    deep = Image.fromarray((np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60).astype(np.uint16))  # 16-bit
    buf = io.BytesIO()
    deep.save(buf, format="PNG")
    rows = {"picture": [{"bytes": buf.getvalue(), "path": None}] + [shape(i % 2, rng) for i in range(1, 20)] +
            [{"bytes": b"not an image", "path": None}], "category": [i % 2 for i in range(21)]}
    feats = datasets.Features({"picture": datasets.Image(), "category": datasets.Value("int64")})
    folder = tmp_path / "custom"
    datasets.Dataset.from_dict(rows, features=feats).save_to_disk(str(folder))
    with pytest.raises(DataError, match=r"no label column .*name it with \?label=COLUMN"):
        build_data(f"hfds:{folder}", CFG)
    splits = build_data(f"hfds:{folder}?label=category", CFG, seed=0)
    everything = torch.utils.data.ConcatDataset([splits.train, splits.val, splits.test])
    row0 = next(i for i, (ds, k) in enumerate((d, k) for d in (splits.train, splits.val, splits.test) for k in range(len(d)))
                if ds.items[k][0] == 0)
    assert everything[row0][0].abs().max() <= 1.0 + 1e-6  # the 16-bit image scaled from its range, not clipped
    bad = [(d, k) for d in (splits.train, splits.val, splits.test) for k in range(len(d)) if d.items[k][0] == 20][0]
    with pytest.raises(DataError, match=r"custom\?label=category/train\[20\] is unreadable .*; drop or fix that row"):
        bad[0][bad[1]]


def test_a_hub_id_without_network_is_one_line_saying_what_to_download(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert main(["train", "--data", "hfds:someone/vtab-1k-cifar", "--method", "linear", "--epochs", "1",
                 "--output", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "save_to_disk('DIR')" in err and "--data hfds:DIR" in err
