"""Dataset sources for `sslctl shard`: turn SRC into named splits of items, without reading pixels.

Five kinds (issue 2), detected by `open_source` unless forced:
    folder  class subfolders (ImageFolder layout), optionally under train/ val/ test/; a tree
            that looks like one but has images elsewhere is refused, not read unlabelled
    images  images at any depth, no labels (the usual pretraining case)
    idx     MNIST / Fashion-MNIST idx files, gzipped or not
    cifar   CIFAR-10 / CIFAR-100 python pickle batches
    csv     a CSV/TSV list of `path[,label]`

An `Item` is either a file (read, verified and encoded later by the shard workers) or a raw
uint8 array (idx, CIFAR). Listing is cheap; all pixel work happens in `sslctl.shard`.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from rich.markup import escape

from sslctl import console
from sslctl.errors import UserError

KINDS = ("folder", "images", "idx", "cifar", "csv")
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


@dataclass
class Item:
    key: str  # WebDataset key: unique in its split, no dots
    label: int | None
    path: str | None = None  # a file on disk (a str: pathlib is slow at a million files), or ...
    array: np.ndarray | None = None  # ... raw pixels, H x W (gray) or H x W x 3 (RGB), uint8


@dataclass
class Source:
    kind: str
    path: Path
    splits: dict[str, list[Item]]
    classes: list[str] | None
    fingerprint: str  # sha256 that changes when the input content changes
    inputs: dict[str, Path] = field(default_factory=dict)  # files hashed into provenance
    ignored: int = 0  # files skipped at listing time (no image extension)

    def describe(self) -> dict:
        return {"kind": self.kind, "path": str(self.path.resolve()), "fingerprint": self.fingerprint}


def standard_mode(img: Image.Image) -> Image.Image:
    """Grayscale stays grayscale ("L"); everything else (palette, RGBA, CMYK, ...) becomes "RGB".

    Shared by the shard workers (statistics) and the readers (sslctl.data), so both see the
    same pixels."""
    if img.mode in ("L", "RGB"):
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit data (PNG, TIFF): keep the top 8 bits
        return Image.fromarray((np.clip(np.asarray(img), 0, 65535).astype(np.uint32) >> 8).astype(np.uint8))
    if img.mode in ("1", "LA", "F"):
        return img.convert("L")
    if img.mode == "P" and "transparency" not in img.info and all(
        r == g == b for r, g, b in zip(*[iter(img.getpalette() or [])] * 3)
    ):
        return img.convert("L")
    return img.convert("RGB")


def open_source(src: str | os.PathLike, kind: str = "auto") -> Source:
    """List SRC as a `Source`; `kind` forces one of KINDS. UserError for a missing or empty SRC."""
    path = Path(src)
    if not path.exists():
        raise UserError(f"{path}: no such file or directory (expected an image folder, idx/CIFAR files or a CSV list)")
    if kind not in ("auto", *KINDS):
        raise UserError(f"--source {kind!r}: unknown source; choose one of auto, {', '.join(KINDS)}")
    layouts, why = None, f"--source {kind}"
    if kind == "auto":
        kind, layouts, why = detect_kind(path)
    if kind == "folder":
        source = _folder(path, layouts)
    else:
        source = {"images": _images, "idx": _idx, "cifar": _cifar, "csv": _csv}[kind](path)
    if not any(source.splits.values()):
        raise UserError(f"{path}: empty source ({kind}): no images found; check the path")
    splits = ", ".join(source.splits)
    classes = f"{len(source.classes)} classes" if source.classes else "no labels"
    console.log(escape(f"source: {DESCRIPTIONS[kind]} {path} ({why}): {classes}, split(s) {splits}"))
    return source


DESCRIPTIONS = {"folder": "class folders under", "images": "unlabelled images under", "idx": "idx files in",
                "cifar": "CIFAR batches in", "csv": "a list of images in"}


def detect_kind(path: Path) -> tuple[str, dict | None, str]:
    """(kind, the folder layouts when it is "folder", so the tree is not listed twice, why).
    UserError for a tree that looks like class folders but is not consistent."""
    if path.is_file():
        name = path.name.lower()
        if name.endswith((".csv", ".tsv")):
            return "csv", None, "a .csv/.tsv file"
        if "idx3-ubyte" in name:
            return "idx", None, "an idx3-ubyte file"
        if name.startswith(("data_batch", "test_batch")) or name in ("train", "test"):
            return "cifar", None, "a CIFAR batch's name"
        raise UserError(
            f"{path}: cannot tell what kind of source this file is; pass a folder, an idx or CIFAR file, "
            "or a .csv/.tsv list, or force one with --source"
        )
    names = {p.name for p in path.iterdir()}
    if any(_IDX_IMAGES.match(n) for n in names):
        return "idx", None, "*-images-idx3-ubyte files"
    if "data_batch_1" in names or {"train", "meta"} <= names:
        return "cifar", None, "CIFAR batch files"
    layouts = {split: _survey(root) for split, root in _split_roots(path).items()}
    why_not = _why_not_class_folders(path, layouts)
    if why_not is None:
        return "folder", layouts, "every image is in a class folder"
    return "images", None, f"not class folders: {why_not}"


# ---------------------------------------------------------------- image folders

def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTS and not name.startswith(".")


def _scan(folder: str) -> tuple[list[str], list[str], int]:
    """(image files, subfolders, how many other files) directly in `folder`, sorted, hidden
    ones left out. os.scandir's cached entry types: no stat call per file while listing."""
    images, dirs, others = [], [], 0
    try:
        with os.scandir(folder) as entries:
            for e in entries:
                if e.name.startswith("."):
                    continue
                if e.is_dir():
                    dirs.append(e.path)
                elif _is_image(e.name):
                    images.append(e.path)
                else:
                    others += 1
    except OSError as err:
        raise UserError(f"{folder}: cannot list this folder ({err.strerror}); check its permissions (ls -ld) "
                        "or move it out of the source") from None
    return sorted(images), sorted(dirs), others


def _enter(folder: str, ancestors: tuple) -> tuple:
    """`ancestors` and this folder's identity; UserError when it is one of them: a symbolic link
    that leads back up the tree would be walked forever."""
    try:
        st = os.stat(folder)
    except OSError as err:
        raise UserError(f"{folder}: cannot read this folder ({err.strerror}); fix or remove it") from None
    identity = (st.st_dev, st.st_ino)
    if identity in ancestors:
        raise UserError(f"{folder}: a symbolic link loop (it leads back to {os.path.realpath(folder)}, which holds it); "
                        "remove the link, or shard a folder without it")
    return (*ancestors, identity)


def _split_roots(path: Path) -> dict[str, str]:
    """{split: folder}: train/ val/ test/ when those are the only subfolders, else {"train": path}."""
    images, dirs, _ = _scan(str(path))
    names = [os.path.basename(d) for d in dirs]
    if dirs and all(n.lower() in SPLIT_NAMES for n in names) and not images:
        roots = {}
        for d, name in zip(dirs, names):
            split = SPLIT_NAMES[name.lower()]
            if split in roots:
                raise UserError(f"{path}: both {os.path.basename(roots[split])}/ and {name}/ name the {split} split; keep one")
            roots[split] = d
        return roots
    return {"train": str(path)}


@dataclass
class Layout:
    """One split's folder, by where its images are: class folders hold them at depth 1."""

    root: str
    classes: dict[str, list[str]]  # subfolder -> the images directly in it
    loose: list[str]  # images directly in the root
    deep: list[str]  # images below the subfolders' level
    empty: list[str]  # subfolders without any image
    ignored: int  # files without an image extension

    @property
    def strays(self) -> list[str]:
        return self.loose + self.deep

    @property
    def looks_labelled(self) -> bool:
        """Two or more folders of images that hold most of the images: meant as class folders."""
        return len(self.classes) >= 2 and sum(map(len, self.classes.values())) >= len(self.strays)


def _survey(root: str) -> Layout:
    top = _enter(root, ())
    loose, dirs, ignored = _scan(root)
    classes, deep, empty = {}, [], []
    for d in dirs:
        inside = _enter(d, top)
        direct, subdirs, others = _scan(d)
        ignored += others
        below = []
        for sub in subdirs:
            more, others = _walk_images(sub, inside)
            below += more
            ignored += others
        if direct:
            classes[d] = direct
        elif not below:
            empty.append(d)
        deep += below
    return Layout(root, classes, loose, deep, empty, ignored)


def _why_not_class_folders(path: Path, layouts: dict[str, Layout]) -> str | None:
    """None for a consistent class-folder tree, else why it is read as unlabelled images.
    UserError for a tree that looks labelled but is not consistent (labels would be dropped)."""
    names = {os.path.basename(d) for layout in layouts.values() for d in layout.classes}
    strays = [p for layout in layouts.values() for p in layout.strays]
    classless = [layout.root for layout in layouts.values() if not layout.classes]
    if len(names) >= 2 and not strays and not classless:
        empty = sorted({os.path.basename(d) for layout in layouts.values() for d in layout.empty} - names)
        if empty:
            folders = [_rel(d, path) for layout in layouts.values() for d in layout.empty if os.path.basename(d) in empty]
            raise UserError(f"{path}: empty class folder(s) {', '.join(folders)}: no images in any split; remove them or "
                            "put their images in them (the classes are the folder names), or pass --source folder to "
                            "leave them out")
        return None
    if any(layout.looks_labelled for layout in layouts.values()):
        n = len(strays)
        where = f"{n} image{'s' if n != 1 else ''} outside them: {_examples(strays, path)}" if strays else \
            f"{', '.join(_rel(r, path) for r in classless)} has no class folders"
        raise UserError(
            f"{path}: looks like class folders (CLASS/IMAGE files, optionally under train/ val/ test/) but {where}. "
            "Move them into class folders or out of the source; or pass --source folder to keep the labels and "
            "leave them out, or --source images to read every image without labels"
        )
    first = next(iter(layouts.values()))
    if first.loose:
        return f"{len(first.loose)} images directly in {first.root}"
    if not first.classes:
        return "the images are below the first level of folders (class folders hold CLASS/IMAGE files)"
    return "only one folder of images" if len(names) < 2 else "most images are outside the folders"


def _rel(p: str, path: Path) -> str:
    return os.path.relpath(p, path).replace(os.sep, "/")


def _examples(files: list[str], path: Path, n: int = 5) -> str:
    shown = ", ".join(_rel(f, path) for f in files[:n])
    return shown + (f" and {len(files) - n} more" if len(files) > n else "")


def _walk_images(root: str, ancestors: tuple = ()) -> tuple[list[str], int]:
    """(every image below root, depth first in sorted order, how many other files)."""
    ancestors = _enter(root, ancestors)
    images, dirs, ignored = _scan(root)
    for d in dirs:
        more, others = _walk_images(d, ancestors)
        images += more
        ignored += others
    return images, ignored


def _key(rel: str, used: set[str]) -> str:
    """A WebDataset key from a relative path: no dots or odd characters, short, unique."""
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", rel.rsplit(".", 1)[0])[-80:] or "img"
    base, n = key, 1
    while key in used:
        key, n = f"{base}_{n}", n + 1
    used.add(key)
    return key


def _file_items(root: str, files: list[str], labels: list[int | None]) -> tuple[list[Item], hashlib._Hash]:
    """Items of image files. The digest of their relative paths and labels identifies the input
    (no stat per file: listing a million files stays cheap; an edit that keeps a file's name
    goes unnoticed by resume)."""
    h, used, items = hashlib.sha256(), set(), []
    for p, label in zip(files, labels):
        rel = p[len(root) + 1 :].replace(os.sep, "/")
        h.update(f"{rel}\t{label}\n".encode())
        items.append(Item(_key(rel, used), label, path=p))
    return items, h


def _folder(path: Path, layouts: dict[str, Layout] | None = None) -> Source:
    """Class folders. Forced (--source folder), images outside them and folders without images
    are left out, with a warning naming them."""
    if not path.is_dir():
        raise UserError(f"{path}: --source folder needs a directory of class subfolders")
    layouts = layouts or {split: _survey(root) for split, root in _split_roots(path).items()}
    if not any(layout.classes for layout in layouts.values()):
        raise UserError(f"{path}: not a class-folder layout (expected CLASS/IMAGE files, one subfolder per class); "
                        "use --source images for unlabelled data")
    strays = [p for layout in layouts.values() for p in layout.strays]
    if strays:
        console.warn(escape(f"--source folder: left out {len(strays)} image(s) outside the class folders: "
                            f"{_examples(strays, path)}"))
    layouts = {split: layout for split, layout in layouts.items() if layout.classes}
    classes = sorted({os.path.basename(d) for layout in layouts.values() for d in layout.classes})
    empty = [_rel(d, path) for layout in layouts.values() for d in layout.empty if os.path.basename(d) not in classes]
    if empty:
        console.warn(escape(f"--source folder: left out folder(s) without images (not classes): {', '.join(empty)}"))
    index = {name: i for i, name in enumerate(classes)}
    digest, splits = hashlib.sha256(), {}
    for split, layout in layouts.items():
        files = [p for images in layout.classes.values() for p in images]
        labels = [index[os.path.basename(d)] for d, images in layout.classes.items() for _ in images]
        splits[split], h = _file_items(layout.root, files, labels)
        digest.update(f"{split}:{h.hexdigest()}\n".encode())
    ignored = sum(layout.ignored for layout in layouts.values())
    return Source("folder", path, splits, classes, digest.hexdigest(), ignored=ignored)


def _images(path: Path) -> Source:
    if not path.is_dir():
        raise UserError(f"{path}: --source images needs a directory of images")
    digest, splits, ignored = hashlib.sha256(), {}, 0
    for split, root in _split_roots(path).items():
        files, others = _walk_images(root)
        splits[split], h = _file_items(root, files, [None] * len(files))
        digest.update(f"{split}:{h.hexdigest()}\n".encode())
        ignored += others
    return Source("images", path, splits, None, digest.hexdigest(), ignored=ignored)


# ---------------------------------------------------------------- idx (MNIST, Fashion-MNIST)

_IDX_IMAGES = re.compile(r"^(?P<prefix>.+?)-images[-.]idx3-ubyte(\.gz)?$")


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzipped or not) as a uint8 array; UserError naming the file if malformed."""
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0:2] != b"\0\0" or raw[2] != 0x08:
        raise UserError(f"{path}: not an idx file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise UserError(f"{path}: truncated idx file ({len(raw) - offset} bytes of data, header says {dims})")
    return np.frombuffer(raw, np.uint8, offset=offset).reshape(dims)


def _idx(path: Path) -> Source:
    if path.is_file():
        image_files = [path]
    else:
        image_files = sorted(p for p in path.iterdir() if _IDX_IMAGES.match(p.name))
    if not image_files:
        raise UserError(f"{path}: no idx image files (*-images-idx3-ubyte[.gz]) found")
    splits, inputs, max_label, labelled = {}, {}, -1, None
    for images_file in image_files:
        m = _IDX_IMAGES.match(images_file.name)
        if not m:
            raise UserError(f"{images_file}: not named like an idx image file (PREFIX-images-idx3-ubyte[.gz])")
        prefix = m["prefix"]
        split = {"train": "train", "t10k": "test", "test": "test"}.get(prefix, re.sub(r"\W+", "_", prefix))
        images = read_idx(images_file)
        if images.ndim not in (3, 4):
            raise UserError(f"{images_file}: expected N x H x W (or N x H x W x C) images, got shape {images.shape}")
        labels_file = next(
            (images_file.parent / f"{prefix}-labels{sep}idx1-ubyte{gz}" for sep in "-." for gz in (".gz", "")
             if (images_file.parent / f"{prefix}-labels{sep}idx1-ubyte{gz}").exists()),
            None,
        )
        if labelled is not None and labelled != (labels_file is not None):
            raise UserError(f"{path}: some idx image files have a labels file and some do not")
        labelled = labels_file is not None
        labels = None
        if labels_file:
            labels = read_idx(labels_file)
            if labels.shape != images.shape[:1]:
                raise UserError(f"{labels_file}: {labels.shape[0]} labels for {images.shape[0]} images in {images_file}")
            max_label = max(max_label, int(labels.max()))
            inputs[f"{split}_labels"] = labels_file
        inputs[f"{split}_images"] = images_file
        width = max(6, len(str(len(images) - 1)))
        splits[split] = [
            Item(f"{i:0{width}d}", None if labels is None else int(labels[i]), array=images[i]) for i in range(len(images))
        ]
    classes = None
    if labelled:
        fashion = "fashion" in str(path.resolve()).lower()
        classes = FASHION_MNIST_CLASSES if fashion and max_label < 10 else [str(i) for i in range(max_label + 1)]
    return Source("idx", path, splits, classes, _hash_files(inputs.values()), inputs)


def _hash_files(files) -> str:
    digest = hashlib.sha256()
    for f in sorted(map(str, files)):
        with open(f, "rb") as fh:
            digest.update(hashlib.file_digest(fh, "sha256").digest())
    return digest.hexdigest()


# ---------------------------------------------------------------- CIFAR-10 / CIFAR-100 pickles

class _SafeUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; never run arbitrary code from a user's file (DESIGN.md §5):
    only plain containers and numpy arrays may be rebuilt."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"),
        ("__builtin__", "object"), ("builtins", "object"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="bytes").load()
    except Exception as err:  # any malformed pickle is a user input problem
        raise UserError(f"{path}: not a CIFAR python pickle batch ({err})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a CIFAR python pickle batch (expected a dict, got {type(obj).__name__})")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar(path: Path) -> Source:
    folder = path.parent if path.is_file() else path
    if path.is_file():
        batches = [path]
    elif (folder / "data_batch_1").exists():
        batches = sorted(folder.glob("data_batch_*")) + [p for p in [folder / "test_batch"] if p.exists()]
    else:
        batches = [p for p in (folder / "train", folder / "test") if p.exists()]
    if not batches:
        raise UserError(f"{path}: no CIFAR batches (data_batch_*, test_batch, or CIFAR-100 train/test) found")
    classes = None
    for meta_name, names_key in (("batches.meta", "label_names"), ("meta", "fine_label_names")):
        if (folder / meta_name).exists():
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in _load_pickle(folder / meta_name)[names_key]]
    splits: dict[str, list[Item]] = {}
    for batch in batches:
        d = _load_pickle(batch)
        labels = d.get("labels", d.get("fine_labels"))
        data = np.asarray(d.get("data"))
        if labels is None or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
            raise UserError(f"{batch}: expected 'data' N x 3072 uint8 and N 'labels'/'fine_labels'")
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # planes R, G, B -> H x W x 3
        split = "test" if batch.name.startswith("test") else "train"
        stem = re.sub(r"\W+", "_", batch.name)
        splits.setdefault(split, []).extend(
            Item(f"{stem}_{i:05d}", int(labels[i]), array=images[i]) for i in range(len(images))
        )
    if classes is None:
        classes = [str(i) for i in range(max(it.label for its in splits.values() for it in its) + 1)]
    return Source("cifar", path, splits, classes, _hash_files(batches), {b.name: b for b in batches})


# ---------------------------------------------------------------- CSV / TSV lists

def _csv(path: Path) -> Source:
    if not path.is_file():
        raise UserError(f"{path}: --source csv needs a .csv or .tsv file of `path[,label]` rows")
    text = path.read_text(encoding="utf-8-sig")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    rows = [r for r in csv.reader(io.StringIO(text), delimiter=delimiter) if r and any(c.strip() for c in r)]
    if rows and rows[0][0].strip().lower() in ("path", "file", "filename", "filepath", "image"):
        rows = rows[1:]  # header
    for n, row in enumerate(rows, 1):
        if len(row) > 2:
            raise UserError(f"{path}: row {n} has {len(row)} columns; expected `path` or `path{delimiter}label`")
    labels = [row[1].strip() if len(row) > 1 else "" for row in rows]
    labelled = any(labels)
    if labelled and not all(labels):
        n = labels.index("") + 1
        raise UserError(f"{path}: row {n} has no label but others do; give every row a label or none")
    classes = None
    if labelled:
        names = set(labels)
        numeric = all(re.fullmatch(r"-?\d+", x) for x in names)
        classes = sorted(names, key=(lambda x: int(x)) if numeric else None)
    index = {c: i for i, c in enumerate(classes or [])}
    used: set[str] = set()
    items = []
    for row, label in zip(rows, labels):
        rel = row[0].strip()
        file = rel if os.path.isabs(rel) else os.path.join(path.parent, rel)
        items.append(Item(_key(rel, used), index[label] if labelled else None, path=file))
    return Source("csv", path, {"train": items}, classes, _hash_files([path]), {"list": path})
