"""Dataset layouts (VTAB-1k lists, FGVC json, ImageFolder, CSV, offline sets) and bad input."""
import pytest
import torch
from fixtures import digit_images, make_fgvc, make_folder, make_vtab

from rlrr.data import DataError, build_data
from rlrr.data.offline import offline_splits

CFG = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic",
       "crop_pct": 0.9}


def test_vtab_layout(tmp_path):
    task = make_vtab(tmp_path)
    s = build_data(f"vtab1k:{task}", CFG)
    assert (len(s.train), len(s.val), len(s.trainval), len(s.test)) == (40, 10, 50, 30)
    assert s.num_classes == 10 and s.name == "svhn"
    x, y = s.train[0]
    assert x.shape == (3, 32, 32) and 0 <= y < 10
    # VTAB evaluation is a plain resize: deterministic
    assert torch.equal(s.test[0][0], s.test[0][0])


def test_fgvc_layout_remaps_labels(tmp_path):
    ds = make_fgvc(tmp_path)
    s = build_data(f"fgvc:{ds}", CFG, num_classes=None)
    labels = [y for _, y in s.trainval.items]
    assert min(labels) == 0 and len(s.test) == 6 and s.num_classes == 200
    assert all(p.is_file() for p, _ in s.test.items)


def test_folder_and_csv(tmp_path):
    root = make_folder(tmp_path / "f")
    s = build_data(f"folder:{root}", CFG, seed=0)
    assert len(s.train) + len(s.val) + len(s.test) == 30
    assert not {p for p, _ in s.train.items} & {p for p, _ in s.test.items}
    rows = ["path,label"] + [f"{p.relative_to(root)},{y}" for p, y in s.trainval.items + s.test.items]
    (root / "labels.csv").write_text("\n".join(rows))
    c = build_data(f"csv:{root / 'labels.csv'}", CFG, seed=0)
    assert len(c.train) + len(c.val) + len(c.test) == 30


def test_csv_labels_may_be_class_names(tmp_path):
    root = make_folder(tmp_path / "f")
    ids = build_data(f"folder:{root}", CFG, seed=0)
    items = ids.trainval.items + ids.test.items
    named = [f"{p.relative_to(root)},{ids.class_names[y]}" for p, y in items]
    for header in (["image,class"], []):  # a header row is optional with names too
        (root / "named.csv").write_text("\n".join(header + named))
        s = build_data(f"csv:{root / 'named.csv'}", CFG, seed=0)
        assert s.class_names == ids.class_names and s.num_classes == ids.num_classes
        assert sorted(s.trainval.items + s.test.items) == sorted(items)  # same class id for every image


def test_one_class_is_refused_naming_the_fix(tmp_path):
    root = make_splits(tmp_path / "d", {"pets": {"cat": 10}})  # --data one folder too high
    with pytest.raises(DataError, match="one class \\(pets\\); a classifier needs two or more: point --data at"):
        build_data(f"folder:{root}", CFG)
    (root / "l.csv").write_text("\n".join(f"pets/cat/{i}.png,0" for i in range(10)))
    with pytest.raises(DataError, match="one class \\(label 0\\); .* check the labels"):
        build_data(f"csv:{root / 'l.csv'}", CFG)
    assert build_data(f"csv:{root / 'l.csv'}", CFG, num_classes=3).num_classes == 3  # ids may name more classes


def make_splits(root, counts: dict[str, dict[str, int]]):
    """``root/<split>/<class>/<i>.png`` with the given number of images per split and class."""
    for split, per_class in counts.items():
        imgs, _ = digit_images(sum(per_class.values()), seed=len(split))
        for cls, n in per_class.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                imgs.pop().save(root / split / cls / f"{i}.png")
    return root


def test_split_folders_are_splits_not_classes(tmp_path):
    root = make_splits(tmp_path / "d", {"train": {"cat": 6, "dog": 5, "emu": 4}, "Val": {"cat": 2, "dog": 2},
                                        "test": {"dog": 3, "emu": 1, "cat": 2}})
    s = build_data(f"folder:{root}", CFG, seed=0)
    assert s.num_classes == 3 and s.class_names == ["cat", "dog", "emu"]  # not ["Val", "test", "train"]
    assert (len(s.train), len(s.val), len(s.trainval), len(s.test)) == (15, 4, 19, 6)
    for split, ds in (("train", s.train), ("Val", s.val), ("test", s.test)):  # each image from its own folder
        assert all(p.parent.parent.name == split and s.class_names[y] == p.parent.name for p, y in ds.items)


def test_missing_split_folders_are_held_out_of_train_and_said(tmp_path, caplog):
    root = make_splits(tmp_path / "d", {"train": {"a": 10, "b": 10}, "test": {"a": 3, "b": 3}})
    s = build_data(f"folder:{root}", CFG, seed=1)
    assert (len(s.train), len(s.val), len(s.test)) == (16, 4, 6)
    assert not {p for p, _ in s.train.items} & {p for p, _ in s.val.items}
    assert all(p.parent.parent.name == "train" for p, _ in s.val.items)
    assert "no val folder; held out 20% of train/ as val (seed 1)" in caplog.text
    only = make_splits(tmp_path / "e", {"training": {"a": 10, "b": 10}})
    s = build_data(f"folder:{only}", CFG, seed=0)
    assert (len(s.train), len(s.val), len(s.test), s.num_classes) == (12, 4, 4, 2)
    assert "held out 20% of training/ as val and 20% as test" in caplog.text


def test_split_folders_that_do_not_fit_are_one_line(tmp_path):
    root = make_splits(tmp_path / "d", {"train": {"a": 4}, "val": {"a": 2, "zebra": 2}})
    with pytest.raises(DataError, match="class 'zebra' has no folder in .*train; every class needs training"):
        build_data(f"folder:{root}", CFG)
    (root / "val" / "zebra").rename(root / "stray")
    with pytest.raises(DataError, match="mixes split folders \\(train, val\\) with 'stray'"):
        build_data(f"folder:{root}", CFG)


def test_offline_splits_are_disjoint_and_real():
    s = offline_splits("mnist", 32, (0.5,) * 3, (0.5,) * 3, seed=0)
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (800, 200, 4000)
    assert set(s["train"].targets) == set(range(10))
    x, _ = s["test"][0]
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1 and x.std() > 0.1


def test_missing_split_file(tmp_path):
    task = make_vtab(tmp_path)
    (task / "val200.txt").unlink()
    with pytest.raises(DataError, match="val200.txt not found"):
        build_data(f"vtab1k:{task}", CFG)


def test_truncated_image_is_named_or_skipped(tmp_path):
    task = make_vtab(tmp_path)
    bad = task / "images" / "0003.png"
    bad.write_bytes(bad.read_bytes()[:40])
    s = build_data(f"vtab1k:{task}", CFG)
    with pytest.raises(DataError, match="0003.png is unreadable or truncated.*--skip-bad-images"):
        [s.train[i] for i in range(len(s.train))]
    s = build_data(f"vtab1k:{task}", CFG, skip_bad=True)
    assert len(s.train) == 39 and s.train.skipped == [bad]


def test_label_out_of_range(tmp_path):
    task = make_vtab(tmp_path)
    (task / "test.txt").write_text("images/0000.png 12\n")
    with pytest.raises(DataError, match="label 12 .* outside 0..9"):
        build_data(f"vtab1k:{task}", CFG)


def test_num_classes_mismatch(tmp_path):
    with pytest.raises(DataError, match=r"--num-classes 7 does not fit the data \(it has 10 classes\)"):
        build_data("offline:digits", CFG, num_classes=7)
    svhn = make_vtab(tmp_path / "a")  # a known VTAB task: its table says 10
    for asked in (5, 12):
        with pytest.raises(DataError, match=rf"--num-classes {asked} does not fit the data \(it has 10 classes\)"):
            build_data(f"vtab1k:{svhn}", CFG, num_classes=asked)
    mine = make_vtab(tmp_path / "b", task="my_task")  # inferred from its labels: more classes may be asked
    assert build_data(f"vtab1k:{mine}", CFG, num_classes=12).num_classes == 12
    with pytest.raises(DataError, match="--num-classes 5 does not fit the data \\(its labels reach 9\\)"):
        build_data(f"vtab1k:{mine}", CFG, num_classes=5)


def test_bad_spec(tmp_path):
    with pytest.raises(DataError, match="needs a kind"):
        build_data(str(tmp_path), CFG)
    with pytest.raises(DataError, match="split file .*foo/train800.txt not found"):
        (tmp_path / "foo").mkdir()
        build_data(f"vtab1k:{tmp_path / 'foo'}", CFG)
