"""Image-file datasets: every on-disk layout (VTAB-1k lists, FGVC json, ImageFolder, CSV) becomes a
list of ``(path, label)`` read by one dataset class, so bad-input handling lives in one place."""
from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Data that cannot be used as given; the message names the file and the fix."""


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB without losing the value range: 16-bit and 32-bit integer images are scaled from their full
    range (PIL's own ``convert`` clips them at 255), float images from [0, 1] or their min..max."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            lo, hi = (0.0, 1.0) if a.min() >= 0 and a.max() <= 1 else (a.min(), max(a.max(), a.min() + 1e-12))
        else:
            lo, hi = 0.0, 65535.0 if img.mode.startswith("I;16") or a.max() <= 65535 else float(2**32 - 1)
        img = Image.fromarray(np.round((a - lo) / (hi - lo) * 255).clip(0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def open_rgb(path: Path | BinaryIO, fix: str = "remove or re-download it, or pass --skip-bad-images",
             name: str | None = None) -> Image.Image:
    """Open and fully decode an image of any mode (a file, or bytes as a file object: an upload, a dataset
    row), turning every decoder failure into one ``DataError`` that names it (``name``) and ends with ``fix``."""
    name = name or (path if isinstance(path, (str, Path)) else "upload")
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(ImageOps.exif_transpose(img))  # phone photos: stored sideways, tagged upright
    except FileNotFoundError:
        raise DataError(f"image {name} does not exist; check the dataset root and the split file") from None
    except Image.DecompressionBombError as e:
        raise DataError(f"image {name} is larger than PIL's decompression-bomb limit ({str(e).split('.')[0]}); "
                        "downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"image {name} is unreadable or truncated ({type(e).__name__}); {fix}") from None


class ImageList(Dataset):
    """Images named by ``(path, label)`` pairs.

    ``skip_bad``: unreadable images are checked once up front, dropped and counted in
    ``self.skipped`` instead of failing mid-epoch (the check decodes every file once).
    """

    def __init__(self, items: list[tuple[Path, int]], num_classes: int, transform: Callable | None = None,
                 skip_bad: bool = False, name: str = "images"):
        for path, label in items:
            if not 0 <= label < num_classes:
                raise DataError(f"{name}: label {label} of {path} is outside 0..{num_classes - 1}; "
                                f"fix the split file or set the number of classes")
        self.skipped: list[Path] = []
        if skip_bad:
            good = []
            for path, label in items:
                try:
                    open_rgb(path)
                    good.append((path, label))
                except DataError:
                    self.skipped.append(path)
            if self.skipped:
                log.warning("%s: skipped %d unreadable image(s), first %s", name, len(self.skipped), self.skipped[0])
            items = good
        self.items, self.num_classes, self.transform, self.name = items, num_classes, transform, name
        self.targets = [label for _, label in items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        img = open_rgb(path)
        return (self.transform(img) if self.transform else img), label


def read_list_file(list_file: Path, image_root: Path) -> list[tuple[Path, int]]:
    """Lines ``relative/path label`` (VTAB-1k community format); the path may contain spaces."""
    if not list_file.is_file():
        raise DataError(f"split file {list_file} not found; the VTAB-1k layout needs train800.txt, "
                        "val200.txt, train800val200.txt and test.txt in the task folder")
    items = []
    for n, line in enumerate(read_text(list_file).splitlines(), 1):
        if not line.strip():
            continue
        path, _, label = line.rstrip().rpartition(" ")
        if not path:
            raise DataError(f"{list_file}:{n}: expected 'relative/path label', got {line!r}")
        items.append((inside(image_root, path, f"{list_file}:{n}"), parse_label(label, f"{list_file}:{n}")))
    if not items:
        raise DataError(f"split file {list_file} lists no images; fill it with 'relative/path label' lines")
    return items


def read_text(path: Path) -> str:
    """A text file the user gave (split list, CSV, JSON) as UTF-8 (a BOM is no path); any other encoding is
    one line naming the file, the line and the fix, not a bare codec message."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x}); save it as UTF-8, e.g. "
                        f"iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name}") from None


def warn_near_twins(where: str, names: list[str]) -> None:
    """The rule for class names: they are taken exactly as written (case and spaces count, as in torchvision's
    ImageFolder: "A" and "a" can be two letters), but names that differ only in case or surrounding spaces
    ("Cat" beside "cat ") are nearly always one class spelt twice, so each such group is warned about."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.strip().casefold(), []).append(name)
    for twins in (g for g in groups.values() if len(g) > 1):
        log.warning("%s: classes %s differ only in case or surrounding spaces and are kept apart as %d classes; "
                    "if they are one class, give them one spelling", where, " and ".join(map(repr, twins)), len(twins))


MAX_CLASSES = 100_000  # ImageNet-21k has 21,841; beyond this a label is a typo, not a class


def parse_label(text: str, where: str) -> int:
    """A class id ``0 <= label < MAX_CLASSES``, or a one-line error naming the file and line."""
    text = text.strip()
    if not text.isdigit():
        raise DataError(f"{where}: label {text!r} is not a class id (a whole number 0, 1, 2, ...)")
    if int(text) >= MAX_CLASSES:
        raise DataError(f"{where}: label {text} would mean more than {MAX_CLASSES:,} classes; labels are class ids "
                        "0..C-1: fix the label")
    return int(text)


def inside(root: Path, relative: str, where: str) -> Path:
    """``root/relative``, refusing a path that leaves ``root`` (``../x``, absolute): a split file names
    images of its own task, and reading files elsewhere silently is how wrong data gets trained on."""
    path = Path(os.path.normpath(root / relative))
    if Path(relative).is_absolute() or not path.is_relative_to(os.path.normpath(root)):
        raise DataError(f"{where}: {relative!r} points outside {root}; split files name images inside the "
                        "dataset folder (move or link the images there)")
    return path


def images_under(folder: Path) -> list[Path]:
    """Image files anywhere under ``folder`` (torchvision's extensions, any case), sorted; hidden files and
    folders (``.ipynb_checkpoints``, ``._x.jpg``) left out."""
    from torchvision.datasets.folder import IMG_EXTENSIONS
    return [p for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMG_EXTENSIONS
            and not any(part.startswith(".") for part in p.relative_to(folder).parts)]


def image_folder(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """torchvision ImageFolder layout: one sub-folder per class, sorted names = class ids."""
    if not root.is_dir():
        raise DataError(f"folder {root} not found; --data folder:DIR needs one sub-folder per class")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))  # .ipynb_checkpoints
    if not classes:
        raise DataError(f"folder {root} has no class sub-folders; put images in DIR/<class>/...")
    per_class = [images_under(root / c) for c in classes]
    empty = [c for c, found in zip(classes, per_class) if not found]
    if empty:
        raise DataError(f"folder {root}: class folder(s) {', '.join(empty[:3])} hold no images; every class needs "
                        "some: fill or remove them")
    return [(p, i) for i, found in enumerate(per_class) for p in found], classes


def csv_list(csv_file: Path) -> tuple[list[tuple[Path, int]], list[str] | None]:
    """A CSV of ``path,label`` rows, paths relative to the CSV's folder; labels are class ids (whole numbers)
    or class names (ids by sorted name, as folder names are; the names are returned), never a mix.  A first
    row whose label is no number and whose path is no image file is a header (``path,label``, ``image,class``)."""
    import csv
    from torchvision.datasets.folder import IMG_EXTENSIONS
    if not csv_file.is_file():
        raise DataError(f"CSV file {csv_file} not found")
    rows, is_id = [], lambda label: label.lstrip("-").isdigit()  # "-1": an id, refused by parse_label below
    for n, row in enumerate(csv.reader(io.StringIO(read_text(csv_file), newline="")), 1):
        if not row:
            continue  # blank line
        if len(row) < 2:
            raise DataError(f"{csv_file}:{n}: expected 'path,label', got {row!r}")
        path, label = row[0].strip(), row[1].strip()
        if n == 1 and not is_id(label) and Path(path).suffix.lower() not in IMG_EXTENSIONS \
                and not (csv_file.parent / path).is_file():
            continue  # header
        if path.isdigit() and not label.isdigit():
            raise DataError(f"{csv_file}:{n}: {row[:2]!r} looks like 'label,path'; the columns are 'path,label'")
        if not label:
            raise DataError(f"{csv_file}:{n}: label '' is not a class id or a class name; every row needs its class")
        rows.append((n, csv_file.parent / path, label))
    ids = [r for r in rows if is_id(r[2])]
    if len(ids) == len(rows):
        return [(path, parse_label(label, f"{csv_file}:{n}")) for n, path, label in rows], None
    if ids:
        n, _, label = next(r for r in rows if not is_id(r[2]))
        raise DataError(f"{csv_file}:{n}: label {label!r} is a class name but line {ids[0][0]} has the class id "
                        f"{ids[0][2]!r}; use ids (0, 1, ...) or names, not both")
    names = sorted({label for _, _, label in rows})
    warn_near_twins(str(csv_file), names)
    index = {name: i for i, name in enumerate(names)}
    return [(path, index[label]) for _, path, label in rows], names
