"""The shard format (DESIGN.md §1): WebDataset tars and the manifest beside them.

    DIR/SPLIT-NNNNNN.tar   per sample KEY.png|jpg|jpeg|webp (+ KEY.cls, ASCII class index)
    DIR/manifest.json      splits -> shards (name, count, bytes, sha256), classes, mean/std, ...

The manifest: `load_manifest`, `write_manifest`, `split_shards`. The writer: `ShardWriter`
(one tar, fixed metadata, so the same samples give the same bytes) and `tar_members` (a sample's
encoded members, for writers that encode in worker processes). The reader: `read_samples`
(webdataset sample dicts {"__key__", "__url__", EXT: bytes}, with seeking over the samples
before `start`) and `image_bytes` / `label_of` for the fields a sample carries.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator

from sslctl.artifacts import atomic_path, atomic_write_json
from sslctl.errors import UserError

FORMAT, VERSION = "sslctl-shards", 1
MANIFEST = "manifest.json"
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")  # in the order a sample's image is looked for
SHARD_NAME = re.compile(r"^[A-Za-z0-9_]+-\d{6}\.tar$")
BLOCK, RECORD = 512, 10240  # tar block and record sizes (tarfile pads archives to a record)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


# ---------------------------------------------------------------- the manifest

def load_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a shards directory (or of the manifest file itself).

    Adds "path": the absolute path of manifest.json, so the shards can be found beside it."""
    path = Path(path)
    file = path / MANIFEST if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{file}: no shards manifest here; make one with `sslctl shard SRC OUT` and pass OUT")
    try:
        manifest = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{file}: not valid JSON ({err}); was it written by `sslctl shard`?") from None
    validate_manifest(manifest, file)
    manifest["path"] = str(file.resolve())
    return manifest


def validate_manifest(manifest, file: str | os.PathLike) -> None:
    """UserError naming `file` unless `manifest` has the format, version and the fields readers use."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{file}: not an sslctl shards manifest (expected \"format\": \"{FORMAT}\")")
    if manifest.get("version") != VERSION:
        raise UserError(f"{file}: shards format version {manifest.get('version')}, this sslctl reads {VERSION}; reshard")
    splits = manifest.get("splits")
    ok = isinstance(splits, dict) and all(
        isinstance(s, dict) and isinstance(s.get("shards"), list) and isinstance(s.get("count"), int)
        and all(isinstance(sh, dict) and isinstance(sh.get("name"), str) and isinstance(sh.get("count"), int)
                for sh in s["shards"])
        for s in splits.values()
    )
    if not ok:
        raise UserError(f"{file}: \"splits\" must map each split to its \"count\" and \"shards\" "
                        "(each with \"name\" and \"count\"); reshard with `sslctl shard`")


def write_manifest(directory: str | os.PathLike, manifest: dict) -> Path:
    """Write DIRECTORY/manifest.json atomically, with the format and version first."""
    record = {"format": FORMAT, "version": VERSION, **{k: v for k, v in manifest.items() if k != "path"}}
    path = Path(directory) / MANIFEST
    validate_manifest(record, path)
    return atomic_write_json(path, record)


def split_shards(manifest_or_path, split: str) -> list[Path]:
    """The tar files of `split`, in stored order."""
    manifest = manifest_or_path if isinstance(manifest_or_path, dict) else load_manifest(manifest_or_path)
    if split not in manifest["splits"]:
        raise UserError(f"{manifest['path']}: no split {split!r}; it has {', '.join(manifest['splits']) or 'none'}")
    root = Path(manifest["path"]).parent
    return [root / s["name"] for s in manifest["splits"][split]["shards"]]


# ---------------------------------------------------------------- the writer

def _tar_size(entries: int) -> int:
    return -(-(entries + 2 * BLOCK) // RECORD) * RECORD


def _header_template() -> bytes:
    import tarfile

    info = tarfile.TarInfo("")
    info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0o444, 0, 0, "", ""
    return info.tobuf(format=tarfile.USTAR_FORMAT)


_TEMPLATE = _header_template()
# Checksum of the template without its name (zeros), size and checksum (8 spaces) fields.
_BASE_SUM = sum(_TEMPLATE[:124]) + sum(_TEMPLATE[136:148]) + 8 * 32 + sum(_TEMPLATE[156:])


def _tar_header(name: str, size: int) -> bytes:
    """The USTAR header tarfile writes for a file with fixed metadata (mtime 0, uid/gid 0,
    mode 0444), patched into a template: tarfile's own header code dominated the run time."""
    name_b, size_b = name.encode("ascii"), b"%011o\0" % size
    checksum = b"%06o\0 " % (_BASE_SUM + sum(name_b) + sum(size_b))
    return name_b.ljust(100, b"\0") + _TEMPLATE[100:124] + size_b + _TEMPLATE[136:148] + checksum + _TEMPLATE[156:]


def tar_members(key: str, ext: str, data: bytes, label: int | None) -> bytes:
    """A sample as tar members: KEY.cls (when labelled) then KEY.EXT, as webdataset's TarWriter
    orders them, each a header plus its data padded to whole blocks. KEY: ASCII, no dots."""
    members = [(ext, data)] if label is None else [("cls", str(label).encode("ascii")), (ext, data)]
    return b"".join(
        _tar_header(f"{key}.{suffix}", len(payload)) + payload + b"\0" * (-len(payload) % BLOCK)
        for suffix, payload in members
    )


class ShardWriter:
    """One shard tar, hashed while written to a temp file that is renamed into place on close.

        writer = ShardWriter(path); writer.add(key, "jpg", data, label); record = writer.close()

    close() returns the manifest's record of the shard: name, count, bytes, sha256."""

    def __init__(self, path: str | os.PathLike):
        self.path, self.count, self.bytes = Path(path), 0, 0
        self._stack = ExitStack()
        tmp = self._stack.enter_context(atomic_path(self.path))
        self._file = self._stack.enter_context(open(tmp, "wb", buffering=1 << 20))
        self._sha = hashlib.sha256()

    def size_with(self, members: bytes) -> int:
        """The tar's size on disk once `members` are added (what a --max-size limit compares)."""
        return _tar_size(self.bytes + len(members))

    def _write(self, chunk: bytes) -> None:
        self._sha.update(chunk)
        self._file.write(chunk)
        self.bytes += len(chunk)

    def add(self, key: str, ext: str, data: bytes, label: int | None) -> None:
        """One sample: KEY.cls (when labelled) and KEY.EXT."""
        self.add_members(tar_members(key, ext, data, label))

    def add_members(self, members: bytes) -> None:
        """One sample already encoded as tar members (by `tar_members`, e.g. in a pool worker)."""
        self._write(members)
        self.count += 1

    def close(self) -> dict:
        self._write(b"\0" * (_tar_size(self.bytes) - self.bytes))  # end-of-archive blocks, record padding
        self._stack.close()  # fsync + rename
        return {"name": self.path.name, "count": self.count, "bytes": self.bytes, "sha256": self._sha.hexdigest()}

    def abort(self) -> None:
        """Drop the temp file; the target is left as it was."""
        self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)


# ---------------------------------------------------------------- the reader

def _tar_files(path: Path, start: int = 0, stop: float = math.inf) -> Iterator[tuple[str, bytes]]:
    """(member name, data) of samples start..stop-1 of one shard.

    Reads the USTAR headers `sslctl shard` writes directly (tarfile's Python header parsing
    cost more than decoding a small JPEG) and seeks over the samples before `start`."""
    with open(path, "rb") as f:
        index, key = -1, None
        while len(header := f.read(BLOCK)) == BLOCK and header[0]:
            name = header[:100].split(b"\0", 1)[0].decode()
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            if header[156:157] not in (b"0", b"\0"):
                raise UserError(f"{path}: tar member {name!r} is not a plain file; not a shard written by `sslctl shard`")
            padded = size + -size % BLOCK
            prefix = name.split(".", 1)[0]
            if prefix != key:
                index, key = index + 1, prefix
            if index >= stop:
                break
            if index < start:
                f.seek(padded, os.SEEK_CUR)
                continue
            data = f.read(padded)
            if len(data) < padded:
                raise UserError(f"{path}: truncated shard (member {name!r}); rerun `sslctl shard` to repair it")
            yield name, data[:size]


_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's rule: the key ends at the file name's first dot


def split_name(name: str) -> tuple[str | None, str]:
    """(key, extension) of a member name as webdataset splits it; (None, "") for a name without one."""
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2).lower()) if m else (None, "")


def read_samples(path: str | os.PathLike, start: int = 0, stop: float = math.inf) -> Iterator[dict]:
    """Samples start..stop-1 of one shard, in stored order, as webdataset samples:
    {"__key__": KEY, "__url__": the shard, EXT: bytes for each member}."""
    sample: dict | None = None
    for name, data in _tar_files(Path(path), start, stop):
        key, ext = split_name(name)
        if key is None:
            continue
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": str(path)}
        sample[ext] = data
    if sample is not None:
        yield sample


def image_ext(sample: dict) -> str | None:
    """The extension of the sample's image member (the first of IMAGE_EXTS it has)."""
    return next((ext for ext in IMAGE_EXTS if ext in sample), None)


def image_bytes(sample: dict) -> bytes:
    ext = image_ext(sample)
    if ext is None:
        raise UserError(f"{sample.get('__url__')}: sample {sample.get('__key__')} has no image (png/jpg/webp)")
    return sample[ext]


def label_of(sample: dict) -> int:
    """The sample's class index from its .cls member; -1 when it has none."""
    return int(sample["cls"]) if "cls" in sample else -1
