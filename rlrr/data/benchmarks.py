"""VTAB-1k and FGVC: task tables and their on-disk layouts (as the official RLRR/SSF/NOAH/VPT code uses)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from .images import DataError, inside, read_list_file, read_text

log = logging.getLogger(__name__)

# name: (classes, group) — the 19 VTAB-1k tasks
VTAB = {
    "cifar": (100, "natural"), "caltech101": (102, "natural"), "dtd": (47, "natural"),
    "oxford_flowers102": (102, "natural"), "oxford_iiit_pet": (37, "natural"), "svhn": (10, "natural"),
    "sun397": (397, "natural"), "patch_camelyon": (2, "specialized"), "eurosat": (10, "specialized"),
    "resisc45": (45, "specialized"), "diabetic_retinopathy": (5, "specialized"), "clevr_count": (8, "structured"),
    "clevr_dist": (6, "structured"), "dmlab": (6, "structured"), "kitti": (4, "structured"),
    "dsprites_loc": (16, "structured"), "dsprites_ori": (16, "structured"), "smallnorb_azi": (18, "structured"),
    "smallnorb_ele": (9, "structured"),
}
VTAB_LISTS = {"train": "train800.txt", "val": "val200.txt", "trainval": "train800val200.txt", "test": "test.txt"}

# name: (classes, image sub-folder relative to the dataset folder) — VPT's json-split layout
FGVC = {"CUB_200_2011": (200, "images"), "nabirds": (555, "images"), "OxfordFlower": (102, ""),
        "StanfordDogs": (120, "Images"), "StanfordCars": (196, "")}


def vtab_items(task_dir: Path) -> tuple[dict[str, list], int]:
    """Items of the four VTAB-1k lists; images paths are relative to the task folder.  Any folder with
    the four lists is a task: the 19 known names keep their class count, others take it from the labels."""
    task = task_dir.name
    if not task_dir.is_dir():
        raise DataError(f"VTAB-1k task folder {task_dir} not found; expected <root>/<task> with the split lists")
    items = {split: read_list_file(task_dir / f, task_dir) for split, f in VTAB_LISTS.items()}
    if task in VTAB:
        return items, VTAB[task][0]
    classes = 1 + max(label for part in items.values() for _, label in part)
    log.warning("%s is not one of the 19 VTAB-1k tasks: %d classes inferred from its labels (or pass --num-classes), "
                "default training settings", task, classes)
    return items, classes


def fgvc_items(ds_dir: Path) -> tuple[dict[str, list], int]:
    """VPT layout: ``train.json`` / ``val.json`` / ``test.json`` mapping image path → label.

    Labels are remapped to 0..C-1 in sorted order over all splits (VPT does it per split, which only
    agrees when every class occurs in every split).
    """
    name = ds_dir.name
    if name not in FGVC:
        raise DataError(f"{name!r} is not an FGVC dataset; choose one of {', '.join(FGVC)}")
    classes, sub = FGVC[name]
    raw = {}
    for split in ("train", "val", "test"):
        f = ds_dir / f"{split}.json"
        if not f.is_file():
            raise DataError(f"split file {f} not found; FGVC needs VPT's train.json, val.json and test.json")
        try:
            raw[split] = json.loads(read_text(f))
        except json.JSONDecodeError as e:
            raise DataError(f"{f}:{e.lineno}: not valid JSON ({e.msg}); VPT's split files map image path to label") from None
    ids = {lab: i for i, lab in enumerate(sorted({lab for m in raw.values() for lab in m.values()}))}
    root = ds_dir / sub
    items = {split: [(inside(root, p, f"{ds_dir / split}.json"), ids[lab]) for p, lab in m.items()]
             for split, m in raw.items()}
    items["trainval"] = items["train"] + items["val"]
    return items, classes
