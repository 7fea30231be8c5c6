"""The shard format (DESIGN.md §1): WebDataset tars and the manifest beside them.

    DIR/SPLIT-NNNNNN.tar   per sample KEY.png|jpg|jpeg|webp (+ KEY.cls, ASCII class index)
    DIR/manifest.json      splits -> shards (name, count, bytes, sha256), classes, mean/std, ...

The manifest: `load_manifest`, `write_manifest`, `split_shards`, and `Stats` (its mean/std).
The writer: `ShardWriter` (one tar, fixed metadata, so the same samples give the same bytes)
and `tar_members` (a sample's encoded members, for writers that encode in worker processes).
The reader: `read_samples` (webdataset sample dicts {"__key__", "__url__", EXT: bytes}, with
seeking over the samples before `start`) reads sslctl's shards and those of other writers
(pax, GNU long names, webdataset's key rules); `image_ext` / `image_bytes` and `Labels` /
`LabelKey` for the fields a sample carries. Where shards are (paths, URLs) is sslctl.streams'
business; what a dataset spec names, sslctl.datasets'.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import math
import os
import re
import struct
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

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
    for split, entry in splits.items():  # names become parts of paths: none may leave its folder
        check_split_name(split, f"{file}: split")
        for shard in entry["shards"]:
            name = shard["name"]
            if not name or "/" in name or "\\" in name or "\0" in name or name in (".", ".."):
                raise UserError(f"{file}: split {split!r} has a shard named {name!r}, which is not a file name; "
                                "reshard with `sslctl shard` or fix the manifest")


_SPLIT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_+-]*(\.[A-Za-z0-9_+-]+)*")


def check_split_name(name: str, where: str) -> str:
    """`name` unless it could leave the folder it is joined to: split names read from an artifact
    or a flag become parts of the file names sslctl writes (embed's parts, for one)."""
    if not isinstance(name, str) or not _SPLIT_NAME.fullmatch(name):
        raise UserError(f"{where} {name!r} is not a split name (letters, digits, _ + - and inner dots; "
                        "no '/' or '..'); reshard with `sslctl shard` or fix the manifest")
    return name


def write_manifest(directory: str | os.PathLike, manifest: dict) -> Path:
    """Write DIRECTORY/manifest.json atomically, with the format and version first."""
    record = {"format": FORMAT, "version": VERSION, **{k: v for k, v in manifest.items() if k != "path"}}
    path = Path(directory) / MANIFEST
    validate_manifest(record, path)
    return atomic_write_json(path, record)


def split_shards(manifest_or_path, split: str) -> list[Path | str]:
    """The shards of `split`, in stored order: paths beside the manifest, or each shard's own
    "url" where it has one (a local path or a URL: shards that are not beside a manifest)."""
    manifest = manifest_or_path if isinstance(manifest_or_path, dict) else load_manifest(manifest_or_path)
    if split not in manifest["splits"]:
        raise UserError(f"{manifest['path']}: no split {split!r}; it has {', '.join(manifest['splits']) or 'none'}")
    shards = manifest["splits"][split]["shards"]
    if any("url" not in s for s in shards):
        root = Path(manifest["path"]).parent
    return [(s["url"] if is_url(s["url"]) else Path(s["url"])) if "url" in s else root / s["name"] for s in shards]


def shard_id(entry: dict) -> str:
    """What stands for a shard's content in a manifest or an index entry: its sha256 where
    known, else its location, sample count and file size/modification time."""
    return entry.get("sha256") or json.dumps([entry.get("url", entry["name"]), entry["count"], entry.get("identity")])


_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(location: str | os.PathLike) -> bool:
    """scheme://... or webdataset's pipe:COMMAND (anything else is a local path)."""
    return isinstance(location, str) and (bool(_SCHEME.match(location)) or location.startswith("pipe:"))


# ---------------------------------------------------------------- statistics (the manifest's mean/std)

MOMENT_PIXELS = 1 << 20  # every image's moments are scaled to this many pixels


def image_moments(img) -> tuple[list[int], list[int], int]:
    """Per-channel (sum, sum of squares, pixels) from PIL's histogram, scaled to MOMENT_PIXELS
    so that every image weighs the same in the mean/std (one 12000 x 12000 image among 32 x 32
    ones must not set them), and rounded to integers so totals do not depend on how the work
    was chunked."""
    hist = np.asarray(img.histogram(), np.int64).reshape(-1, 256)
    v = np.arange(256, dtype=np.int64)
    pixels = int(hist[0].sum())

    def scaled(totals) -> list[int]:
        return [(int(t) * MOMENT_PIXELS + pixels // 2) // pixels for t in totals]

    return scaled(hist @ v), scaled(hist @ (v * v)), MOMENT_PIXELS


class Stats:
    """Pixel moments of the decoded images (`image_moments`: each image weighs the same; gray
    and colour apart), image sizes, and how many images have colour (from every image's header)."""

    def __init__(self, d: dict | None = None):
        d = d or {}
        self.gray = d.get("gray", [0, 0, 0])  # sum, sum of squares, pixels
        self.rgb = d.get("rgb", [[0, 0, 0], [0, 0, 0], 0])
        self.sizes = collections.Counter(d.get("sizes", {}))
        self.colour, self.decoded = d.get("colour", 0), d.get("decoded", 0)

    def add(self, size, channels: int, moments) -> None:
        self.sizes[f"{size[0]}x{size[1]}"] += 1
        self.colour += channels == 3
        if moments is None:
            return
        sums, sumsqs, pixels = moments
        self.decoded += 1
        if channels == 1:
            self.gray = [self.gray[0] + sums[0], self.gray[1] + sumsqs[0], self.gray[2] + pixels]
        else:
            s, q, n = self.rgb
            self.rgb = [[a + b for a, b in zip(s, sums)], [a + b for a, b in zip(q, sumsqs)], n + pixels]

    def merge(self, other: Stats) -> None:
        self.gray = [a + b for a, b in zip(self.gray, other.gray)]
        s, q, n = self.rgb
        self.rgb = [[a + b for a, b in zip(s, other.rgb[0])], [a + b for a, b in zip(q, other.rgb[1])], n + other.rgb[2]]
        self.sizes.update(other.sizes)
        self.colour += other.colour
        self.decoded += other.decoded

    def to_dict(self) -> dict:
        return {"gray": self.gray, "rgb": self.rgb, "sizes": dict(sorted(self.sizes.items())),
                "colour": self.colour, "decoded": self.decoded}

    @property
    def channels(self) -> int:
        return 3 if self.colour else 1

    def mean_std(self, channels: int) -> tuple[list[float], list[float]]:
        """Per channel, in 0..1; grayscale images count as R = G = B in a colour dataset."""
        c = channels
        g_sum, g_sq, g_n = self.gray
        sums = [g_sum + (self.rgb[0][i] if c == 3 else 0) for i in range(c)]
        sqs = [g_sq + (self.rgb[1][i] if c == 3 else 0) for i in range(c)]
        n = max(1, g_n + (self.rgb[2] if c == 3 else 0))
        mean = [s / n / 255 for s in sums]
        std = [math.sqrt(max(0.0, q / n / 255**2 - m * m)) for q, m in zip(sqs, mean)]
        return [round(m, 6) for m in mean], [round(s, 6) for s in std]

    def common_size(self) -> list[int] | None:
        if not self.sizes:
            return None
        best = max(self.sizes.items(), key=lambda kv: (kv[1], kv[0]))[0]
        return [int(x) for x in best.split("x")]


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

class ShardError(UserError):
    """A shard that cannot be read, or not to its end (missing, truncated, corrupt, unreachable)."""

    def __init__(self, location, reason: str):
        self.location, self.reason = str(location), reason
        super().__init__(f"{location}: {reason}")


_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members (__index__ ...): not samples
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_FILE_TYPES = (b"0", b"\0", b"7")  # regular file (and contiguous file)


def split_name(name: str) -> tuple[str | None, str]:
    """(key, extension) of a member name as webdataset splits it (its base_plus_ext: the key
    ends at the file name's first dot): dir.v1/img.0001.jpg -> ("dir.v1/img", "0001.jpg"); the
    extension lower-cased; (None, "") for a name without one."""
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2).lower()) if m else (None, "")


def is_image(ext: str) -> bool:
    """A member holds the sample's image when its extension's last part is an image format
    (jpg, left.jpg, image.png ...)."""
    return ext in IMAGE_EXTS or ext.rsplit(".", 1)[-1] in IMAGE_EXTS


def _number(field: bytes) -> int:
    """A tar number field: octal text, or base-256 (GNU, for sizes of 8 GiB and more)."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big") - (1 << 8 * (len(field) - 1) if field[0] == 0xFF else 0)
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _pax_records(data: bytes) -> dict[str, str]:
    """A pax extended header's 'LEN key=value\\n' records."""
    records, i = {}, 0
    while i < len(data) and data[i] != 0:
        space = data.index(b" ", i)
        end = i + int(data[i:space])
        key, _, value = data[space + 1 : end - 1].partition(b"=")
        records[key.decode("ascii", "replace")] = value.decode("utf-8", "surrogateescape")
        i = end
    if not records.get("size", "0").isdigit():
        raise ValueError(f"pax size {records['size']!r}")
    return records


class _Members:
    """The regular-file members of a tar stream: iterate for (name, size), call data() for the
    current member's bytes; what is not read is skipped (a seek on files). Understands what
    other writers produce: USTAR prefixes, pax headers (long names, sizes), GNU long names;
    directories, links and other member types are passed over. Checks every header's checksum."""

    def __init__(self, f, where: str):
        self.f, self.where = f, where
        self._skip = getattr(f, "skip", None) or (lambda n: f.seek(n, os.SEEK_CUR))
        try:
            self._size = os.fstat(f.fileno()).st_size
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            self._size = getattr(f, "size", None)
        self.offset, self._pending = 0, 0

    def _read(self, n: int, what: str) -> bytes:
        data = self.f.read(n)
        self.offset += len(data)
        if len(data) < n:
            raise ShardError(self.where, f"truncated: ends at byte {self.offset:,}, inside {what}")
        return data

    def _pass(self, n: int, what: str) -> None:
        if not n:
            return
        self._skip(n)
        self.offset += n
        if self._size is not None and self.offset > self._size:
            raise ShardError(self.where, f"truncated: ends at byte {self._size:,}, inside {what}")

    def data(self, size: int) -> bytes:
        """The current member's bytes (once)."""
        padded, self._pending = self._pending, 0
        data = self.f.read(padded)
        self.offset += len(data)
        if len(data) < padded:
            raise ShardError(self.where, f"truncated: ends at byte {self.offset:,}, inside a member's data")
        return data[:size]

    def __iter__(self) -> Iterator[tuple[str, int]]:
        long_name, pax = None, {}
        while True:
            if self._pending:
                pending, self._pending = self._pending, 0
                self._pass(pending, "a member's data")
            header = self.f.read(BLOCK)
            self.offset += len(header)
            if not header or not header[0]:  # end of data, or the end-of-archive zero blocks
                return
            if len(header) < BLOCK:
                raise ShardError(self.where, f"truncated: ends at byte {self.offset:,}, inside a tar header")
            try:
                size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8) if header[124] < 0x80 else _number(header[124:136])
                # POSIX and GNU headers carry a magic; older ones are checked by their checksum
                # (summing 512 bytes in Python would cost more than the rest of the header).
                ok = header[257:262] == b"ustar" or _checksum_ok(header)
            except ValueError:
                ok = False
            if not ok:
                raise ShardError(self.where, f"corrupt: not a tar header at byte {self.offset - BLOCK:,}")
            kind = header[156:157]
            if kind in _FILE_TYPES:
                name = None
                if long_name is not None or pax:  # a GNU long name or pax attributes came first
                    name, size = long_name or pax.get("path"), int(pax.get("size", size))
                    long_name, pax = None, {}
                if name is None:
                    name = header[:100].split(b"\0", 1)[0]
                    if header[345] and header[257:263] == b"ustar\0":  # POSIX: the start of a long path
                        name = header[345:500].split(b"\0", 1)[0] + b"/" + name
                    name = name.decode("utf-8", "surrogateescape")
                self._pending = size + -size % BLOCK
                yield name, size
                continue
            padded = size + -size % BLOCK
            if kind == b"L":  # GNU: the next member's long name
                long_name = self._read(padded, "a long name")[:size].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif kind == b"x":  # pax: the next member's attributes
                try:
                    pax = _pax_records(self._read(padded, "a pax header")[:size])
                except ValueError:
                    raise ShardError(self.where, f"corrupt: unreadable pax header at byte {self.offset:,}") from None
            else:  # directories, links, global pax headers, GNU long link names ...
                long_name, pax = (long_name, pax) if kind == b"K" else (None, {})
                self._pass(padded, "a member")


def _checksum_ok(header: bytes) -> bool:
    stored = _number(header[148:156])
    return stored in (sum(header) - sum(header[148:156]) + 256, sum(struct.unpack_from("148b8x356b", header)) + 256)


def read_samples(source, start: int = 0, stop: float = math.inf, *, location: str | None = None,
                 load: Callable[[str], bool] | None = None) -> Iterator[dict]:
    """Samples start..stop-1 of one shard, in stored order, as webdataset samples:
    {"__key__": KEY, "__url__": where it came from, EXT: bytes for each member}.

    source: a local path, or a binary stream (read(n), and skip(n) or seek) with `location`
    naming it. A sample is a run of members with one key (webdataset's rules) that holds an
    image (`is_image`); other runs (a lone .json, metadata) are passed over and not counted.
    The samples before `start` are skipped without reading their data. load(ext) False: that
    member's data is not read (its value is None). Raises ShardError where the shard is
    truncated or corrupt, after the samples before that point."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            yield from _samples(_Members(f, str(source)), start, stop, load)
    else:
        yield from _samples(_Members(source, location or "<stream>"), start, stop, load)


def _samples(members: _Members, start: int, stop: float, load) -> Iterator[dict]:
    index = 0  # samples before the current key
    key, sample, has_image = None, None, False
    for name, size in members:
        k, ext = split_name(name)
        if k is None or (name.startswith("__") and _META.match(name)):
            continue
        if k != key:
            if has_image:
                if sample is not None:
                    yield sample
                index += 1
            if index >= stop:
                return
            key, has_image = k, False
            sample = {"__key__": k, "__url__": members.where} if index >= start else None
        has_image = has_image or is_image(ext)
        if sample is not None and ext not in sample:
            sample[ext] = members.data(size) if load is None or load(ext) else None
    if has_image and sample is not None:
        yield sample


def image_ext(sample: dict) -> str | None:
    """The extension of the sample's image member: the first of IMAGE_EXTS it has, else the
    first (in name order) whose last part is one (left.jpg)."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext
    return next((ext for ext in sorted(sample) if not ext.startswith("__") and is_image(ext)), None)


def image_bytes(sample: dict) -> bytes:
    """The sample's image file, its size checked against `max_pixels()` from its header."""
    ext = image_ext(sample)
    if ext is None:
        raise UserError(f"{sample.get('__url__')}: sample {sample.get('__key__')} has no image (png/jpg/webp)")
    check_pixels(sample[ext])
    return sample[ext]


# ---------------------------------------------------------------- the decompression-bomb guard

MAX_PIXELS = 100_000_000  # a 10000 x 10000 image; a 600-byte JPEG can claim 60000 x 60000 (3.6 GB decoded)
# sslctl checks every image's header against its own limit before decoding; PIL's (which warns
# at 89 Mpx and refuses at 179 Mpx) is off, so that limit is the one that counts.
Image.MAX_IMAGE_PIXELS = None


class ImageTooLarge(ValueError):
    pass


def max_pixels() -> int:
    """The readers' limit: SSLCTL_MAX_PIXELS (a whole number of pixels), else MAX_PIXELS."""
    text = os.environ.get("SSLCTL_MAX_PIXELS")
    if text is None:
        return MAX_PIXELS
    try:
        return max(1, int(text))
    except ValueError:
        raise UserError(f"SSLCTL_MAX_PIXELS={text!r}: expected a whole number of pixels, like 200000000") from None


def check_pixels(data: bytes, limit: int | None = None, hint: str = "set SSLCTL_MAX_PIXELS to raise it") -> None:
    """ImageTooLarge when the image file's header claims more than `limit` pixels. PIL reads
    only the header here (tens of microseconds), no pixel is decoded."""
    check_size(*Image.open(io.BytesIO(data)).size, limit, hint)


def check_size(width: int, height: int, limit: int | None = None, hint: str = "set SSLCTL_MAX_PIXELS to raise it") -> None:
    limit = max_pixels() if limit is None else limit
    if width * height > limit:
        raise ImageTooLarge(f"{width} x {height} = {width * height:,} pixels, over the limit of {limit:,} "
                            f"(a decompression-bomb guard; {hint})")


def label_of(sample: dict) -> int:
    """The sample's class index from its .cls member; -1 when it has none."""
    return int(sample["cls"]) if "cls" in sample else -1


class LabelKey:
    """Where a sample's label is: a member EXT whose text is the label (cls: webdataset's and
    sslctl's class index), or EXT:FIELD, a field of a JSON member (dotted for nesting:
    json:meta.label). value(sample) is the label as text (an integer or a class name), or None."""

    def __init__(self, key: str | None = None):
        key = key or "cls"
        ext, colon, field = key.partition(":")
        if not ext or (colon and not field) or "/" in ext:
            raise UserError(f"--label-key {key!r}: expected a member extension (cls, label.txt) or "
                            "EXT:FIELD for a field of a JSON member (json:label, json:meta.class)")
        self.key, self.ext, self.field = key, ext.lower(), field.split(".") if field else None

    def value(self, sample: dict) -> str | None:
        data = sample.get(self.ext)
        if data is None:
            return None
        if self.field is None:
            return data.decode("utf-8", "replace").strip() or None
        try:
            obj = json.loads(data)
        except ValueError:
            return None
        for part in self.field:
            if not isinstance(obj, dict) or part not in obj:
                return None
            obj = obj[part]
        if isinstance(obj, float) and obj.is_integer():
            obj = int(obj)
        return str(obj) if isinstance(obj, (int, str)) and not isinstance(obj, bool) and str(obj) else None


class Labels:
    """A dataset's labels: labels(sample) -> class index, -1 when the sample has none.

    From a manifest or index: its "label_key" (default cls), and "label_names" when its labels
    are class names (their index in "classes") rather than integers. wants(ext): whether a
    reader must load that member (the image or the label; sidecars are not read)."""

    def __init__(self, manifest: dict):
        self.key = LabelKey(manifest.get("label_key"))
        names = manifest.get("classes") if manifest.get("label_names") else None
        self.index = {name: i for i, name in enumerate(names)} if names else None

    def __call__(self, sample: dict) -> int:
        if self.index is not None:
            return self.index.get(self.key.value(sample), -1)
        data = sample.get(self.key.ext)
        if data is None:
            return -1
        if self.key.field is None:
            try:
                return int(data)
            except ValueError:
                return -1
        value = self.key.value(sample)
        return int(value) if value is not None and value.lstrip("-").isdigit() else -1

    def wants(self, ext: str) -> bool:
        return ext == self.key.ext or is_image(ext)
