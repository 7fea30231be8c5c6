"""`sslctl shard SRC OUT`: a dataset source -> WebDataset tar shards + manifest.json (DESIGN.md §1).

    OUT/train-000000.tar ...   per sample KEY.png|jpg|webp (+ KEY.cls, ASCII class index)
    OUT/manifest.json          counts, classes, per-shard bytes/sha256, mean/std, skipped inputs
    OUT/.sslctl-shard-state.json   progress journal: what resume trusts (after re-hashing)

Pixel work (read, verify by full decode, statistics, optional re-encode) runs in a process pool;
the main process writes shards in a fixed order, so the output does not depend on --workers.
Fixed tar metadata (mtime 0, uid/gid 0, mode 0444) and a seeded sample order make the shards
byte-identical for the same input and flags.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import math
import os
import random
import re
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from sslctl import console
from sslctl.artifacts import atomic_path, atomic_write_json, provenance, sha256_file
from sslctl.errors import UserError
from sslctl.sources import Item, Source, open_source, standard_mode

FORMAT, VERSION = "sslctl-shards", 1
MANIFEST = "manifest.json"
STATE = ".sslctl-shard-state.json"
FORMATS = ("keep", "png", "jpg", "webp")
_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # formats stored as their original bytes
_SAVE = {"jpg": ("JPEG", {"quality": 95}), "png": ("PNG", {}), "webp": ("WEBP", {"quality": 95})}
_SHARD_NAME = re.compile(r"^[A-Za-z0-9_]+-\d{6}\.tar$")
_BLOCK, _RECORD = 512, 10240  # tar block and record sizes (tarfile pads archives to a record)


@dataclass(frozen=True)
class Options:
    """Everything that changes the shards' bytes; recorded in the manifest, part of its fingerprint."""

    max_count: int = 10_000
    max_size: int = 512 * 2**20
    val_fraction: float = 0.0
    seed: int = 0
    max_side: int | None = None
    format: str = "keep"


def parse_size(text: str | int) -> int:
    """'512MB', '1G', '300k', '1048576' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", str(text).lower())
    if not m:
        raise UserError(f"--max-size {text!r}: expected a size like 512MB, 1G or 1048576")
    return int(float(m[1]) * 1024 ** "_kmgt".index(m[2] or "_"))


# ---------------------------------------------------------------- reading the manifest

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
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{file}: not an sslctl shards manifest (expected \"format\": \"{FORMAT}\")")
    if manifest.get("version") != VERSION:
        raise UserError(f"{file}: shards format version {manifest.get('version')}, this sslctl reads {VERSION}; reshard")
    manifest["path"] = str(file.resolve())
    return manifest


def split_shards(manifest_or_path, split: str) -> list[Path]:
    """The tar files of `split`, in stored order."""
    manifest = manifest_or_path if isinstance(manifest_or_path, dict) else load_manifest(manifest_or_path)
    if split not in manifest["splits"]:
        raise UserError(f"{manifest['path']}: no split {split!r}; it has {', '.join(manifest['splits']) or 'none'}")
    root = Path(manifest["path"]).parent
    return [root / s["name"] for s in manifest["splits"][split]["shards"]]



# ---------------------------------------------------------------- the worker side

def _prepare(task: tuple[list, int | None, str]) -> list[tuple]:
    """Read, verify and (if asked) re-encode a chunk of items, in a pool worker.

    Each result is ("ok", ext, bytes, (h, w), channels, sums, sumsqs, pixels) or ("skip", reason).
    Statistics are exact integers, so their total does not depend on how work was chunked."""
    payloads, max_side, fmt = task
    return [_prepare_one(p, max_side, fmt) for p in payloads]


def _prepare_one(payload, max_side: int | None, fmt: str) -> tuple:
    data, original = None, None
    if isinstance(payload, np.ndarray):
        img = Image.fromarray(payload)
    else:
        try:
            data = Path(payload).read_bytes()
        except OSError as err:
            return ("skip", f"unreadable: {err.strerror or err}")
        if not data:
            return ("skip", "empty file (0 bytes)")
        try:
            img = Image.open(io.BytesIO(data))
            original = img.format
            img.load()  # a full decode: the only way to catch a truncated file
        except UnidentifiedImageError:
            return ("skip", "not an image (unrecognised file format)")
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
            return ("skip", f"corrupt or truncated image: {err}")
    img = standard_mode(img)
    resized = bool(max_side and max(img.size) > max_side)
    if resized:
        scale = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
    ext = _EXT.get(original, "png") if fmt == "keep" else fmt
    if data is None or resized or _EXT.get(original) != ext:
        name, kwargs = _SAVE[ext]
        buf = io.BytesIO()
        img.save(buf, name, **kwargs)
        data = buf.getvalue()
    pixels = np.asarray(img).reshape(img.height * img.width, -1).astype(np.int64)
    sums = [int(s) for s in pixels.sum(0)]
    sumsqs = [int(s) for s in (pixels * pixels).sum(0)]
    return ("ok", ext, data, (img.height, img.width), pixels.shape[1], sums, sumsqs, len(pixels))


def _ordered_map(fn, tasks: list, workers: int):
    """fn over tasks in order, `workers` processes, a bounded number of tasks in flight."""
    if workers <= 1:
        yield from map(fn, tasks)
        return
    with ProcessPoolExecutor(workers) as pool:
        pending = collections.deque()
        for task in tasks:
            pending.append(pool.submit(fn, task))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ---------------------------------------------------------------- statistics

class Stats:
    """Exact per-channel pixel sums of grayscale and colour images, and an image-size histogram."""

    def __init__(self, d: dict | None = None):
        d = d or {}
        self.gray = d.get("gray", [0, 0, 0])  # sum, sum of squares, pixels
        self.rgb = d.get("rgb", [[0, 0, 0], [0, 0, 0], 0])
        self.sizes = collections.Counter(d.get("sizes", {}))

    def add(self, size, channels, sums, sumsqs, pixels) -> None:
        if channels == 1:
            self.gray = [self.gray[0] + sums[0], self.gray[1] + sumsqs[0], self.gray[2] + pixels]
        else:
            s, q, n = self.rgb
            self.rgb = [[a + b for a, b in zip(s, sums)], [a + b for a, b in zip(q, sumsqs)], n + pixels]
        self.sizes[f"{size[0]}x{size[1]}"] += 1

    def merge(self, other: Stats) -> None:
        self.gray = [a + b for a, b in zip(self.gray, other.gray)]
        s, q, n = self.rgb
        self.rgb = [[a + b for a, b in zip(s, other.rgb[0])], [a + b for a, b in zip(q, other.rgb[1])], n + other.rgb[2]]
        self.sizes.update(other.sizes)

    def to_dict(self) -> dict:
        return {"gray": self.gray, "rgb": self.rgb, "sizes": dict(sorted(self.sizes.items()))}

    @property
    def channels(self) -> int:
        return 3 if self.rgb[2] else 1

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


# ---------------------------------------------------------------- the writer side

class _HashingFile:
    """A write-only file that hashes and counts what passes through (no re-read to hash a shard)."""

    def __init__(self, f):
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.bytes += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def _entry_size(n: int) -> int:
    return _BLOCK + -(-n // _BLOCK) * _BLOCK


def _tar_size(entries: int) -> int:
    return -(-(entries + 2 * _BLOCK) // _RECORD) * _RECORD


class _ShardWriter:
    """One `SPLIT-NNNNNN.tar`, written to a temp file and renamed into place when closed.

    Plain tarfile rather than webdataset's TarWriter: the same layout (KEY.EXT members, a
    sample's members together, sorted by extension) without importing torch into this stage."""

    def __init__(self, path: Path):
        self.path, self.count, self.entries = path, 0, 0
        self._stack = ExitStack()
        tmp = self._stack.enter_context(atomic_path(path))
        self._file = _HashingFile(self._stack.enter_context(open(tmp, "wb")))
        self._tar = tarfile.open(fileobj=self._file, mode="w|", format=tarfile.USTAR_FORMAT)
        self.stats = Stats()

    @staticmethod
    def sample_size(data: bytes, label: int | None) -> int:
        return _entry_size(len(data)) + (0 if label is None else _entry_size(len(str(label))))

    def size_with(self, extra: int) -> int:
        return _tar_size(self.entries + extra)

    def add(self, key: str, ext: str, data: bytes, label: int | None) -> None:
        members = {ext: data} if label is None else {"cls": str(label).encode("ascii"), ext: data}
        for suffix in sorted(members):
            # Fixed metadata: the bytes depend on the content alone (determinism).
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mtime, info.mode, info.uid, info.gid = len(members[suffix]), 0, 0o444, 0, 0
            self._tar.addfile(info, io.BytesIO(members[suffix]))
        self.entries += self.sample_size(data, label)
        self.count += 1

    def close(self) -> dict:
        self._tar.close()
        self._stack.close()  # fsync + rename
        assert self._file.bytes == _tar_size(self.entries), "tar size estimate is off"
        return {"name": self.path.name, "count": self.count, "bytes": self._file.bytes,
                "sha256": self._file.sha.hexdigest()}

    def abort(self) -> None:
        self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)


# ---------------------------------------------------------------- the stage

def _ordered_splits(source: Source, opts: Options) -> dict[str, list[Item]]:
    """Each split's items in shard order: a seeded shuffle (deterministic), after carving
    a stratified validation split out of train when --val-fraction asks for one."""
    splits = {k: list(v) for k, v in source.splits.items() if v}
    if opts.val_fraction:
        if "val" in splits:
            raise UserError(f"{source.path} already has a val split; drop --val-fraction")
        if "train" not in splits:
            raise UserError(f"{source.path}: --val-fraction needs a train split to carve from")
        rng = random.Random(opts.seed)
        groups: dict = collections.defaultdict(list)
        for i, item in enumerate(splits["train"]):
            groups[item.label if item.label is not None else -1].append(i)
        val = set()
        for label in sorted(groups):
            members = groups[label]
            val.update(rng.sample(members, round(opts.val_fraction * len(members))))
        if not val or len(val) == len(splits["train"]):
            raise UserError(f"--val-fraction {opts.val_fraction}: leaves an empty train or val split")
        splits["val"] = [it for i, it in enumerate(splits["train"]) if i in val]
        splits["train"] = [it for i, it in enumerate(splits["train"]) if i not in val]
    for name, items in splits.items():
        random.Random(f"{opts.seed}:{name}").shuffle(items)
    return dict(sorted(splits.items(), key=lambda kv: ("train", "val", "test").index(kv[0]) if kv[0] in ("train", "val", "test") else 3))


def _fingerprint(source: Source, opts: Options) -> str:
    record = {"format": FORMAT, "version": VERSION, "source": source.kind, "input": source.fingerprint,
              "options": asdict(opts)}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _check_out(out: Path, fingerprint: str) -> dict:
    """The resumable state in OUT, {} for a fresh start; UserError if OUT holds anything else."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; choose another OUT")
    if not out.exists():
        return {}
    manifest, state = _load_json(out / MANIFEST), _load_json(out / STATE)
    for found, what in ((manifest, MANIFEST), (state, STATE)):
        if found is not None and found.get("fingerprint") != fingerprint:
            made_from = (manifest or {}).get("source", {}).get("path") or "another source"
            raise UserError(
                f"{out / what}: OUT already holds a different dataset (made from {made_from} with other "
                "input or options); nothing was overwritten. Choose another OUT or delete it first"
            )
    if state is None and manifest is None:
        others = sorted(p.name for p in out.iterdir() if not (p.name.startswith(".") and p.name.endswith(".tmp")))
        if others:
            raise UserError(
                f"{out}: not empty and not an sslctl shards directory (holds {others[0]!r}); "
                "nothing was overwritten. Choose an empty or new OUT"
            )
    return state or {}


def _verified_prefix(out: Path, split_state: dict) -> list[dict]:
    """The finished shards of a split whose files still hash to what was recorded."""
    kept = []
    for shard in split_state.get("shards", []):
        path = out / shard["name"]
        if not path.is_file() or path.stat().st_size != shard["bytes"] or sha256_file(path) != shard["sha256"]:
            console.warn(f"{path}: missing or changed since it was written; redoing it and the shards after it")
            break
        kept.append(shard)
    return kept


def shard(src: str | os.PathLike, out: str | os.PathLike, *, source: str = "auto", options: Options = Options(),
          workers: int | None = None) -> Path:
    """Shard SRC into OUT; returns the manifest path. Resumes a run that was interrupted."""
    opts = options
    if opts.max_count < 1 or opts.max_size < 1:
        raise UserError("--max-count and --max-size must be positive")
    if not 0 <= opts.val_fraction < 1:
        raise UserError(f"--val-fraction {opts.val_fraction}: expected a fraction in [0, 1)")
    if opts.format not in FORMATS:
        raise UserError(f"--format {opts.format!r}: choose one of {', '.join(FORMATS)}")
    if opts.max_side is not None and opts.max_side < 1:
        raise UserError("--max-side must be a positive number of pixels")
    workers = max(1, workers or len(os.sched_getaffinity(0)))
    out = Path(out)

    src_obj = open_source(src, source)
    fingerprint = _fingerprint(src_obj, opts)
    state = _check_out(out, fingerprint)
    splits = _ordered_splits(src_obj, opts)
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob(".*.tmp"):  # temp files of a killed run
        tmp.unlink()
    state = {"format": "sslctl-shard-state", "fingerprint": fingerprint,
             "splits": {name: state.get("splits", {}).get(name, {}) for name in splits}}
    for name, split_state in state["splits"].items():
        kept = _verified_prefix(out, split_state)
        done = split_state.get("done") and len(kept) == len(split_state.get("shards", []))
        resume = len(splits[name]) if done else (kept[-1]["end"] if kept else 0)
        state["splits"][name] = {"shards": kept, "done": bool(done),
                                 "skipped": [s for s in split_state.get("skipped", []) if s["index"] < resume]}
    atomic_write_json(out / STATE, state)
    if src_obj.ignored:
        console.log(f"ignored {src_obj.ignored} file(s) without an image extension under {src_obj.path}")

    started, done_now, warned = time.perf_counter(), 0, 0
    with console.progress() as bar:
        for name, items in splits.items():
            split_state = state["splits"][name]
            if split_state["done"]:
                continue
            resume = split_state["shards"][-1]["end"] if split_state["shards"] else 0
            if resume:
                console.log(f"{name}: resuming after {len(split_state['shards'])} verified shard(s)")
            task = bar.add_task(f"shard {name}", total=len(items), completed=resume)
            n_done, warned = _write_split(out, name, items, resume, split_state, state, opts, workers, bar, task, warned)
            done_now += n_done
    elapsed = time.perf_counter() - started

    manifest_path = out / MANIFEST
    manifest = _manifest(src_obj, opts, fingerprint, splits, state)
    existing = _load_json(manifest_path)
    if existing is None or {k: v for k, v in existing.items() if k != "provenance"} != {
        k: v for k, v in manifest.items() if k != "provenance"
    }:
        atomic_write_json(manifest_path, manifest)
    _remove_stale_shards(out, manifest)
    _summary(manifest, done_now, elapsed)
    return manifest_path


def _write_split(out, name, items, resume, split_state, state, opts, workers, bar, task, warned):
    """Shard items[resume:] of one split; journal every finished shard so a kill loses at most one."""
    todo = items[resume:]
    chunk = max(8, min(256, len(todo) // (workers * 8) or 8))
    tasks = [([it.array if it.path is None else str(it.path) for it in todo[i : i + chunk]], opts.max_side, opts.format)
             for i in range(0, len(todo), chunk)]
    writer, index, n_ok = None, resume, 0

    def finish(end: int) -> None:
        record = writer.close()
        split_state["shards"].append({**record, "end": end, "stats": writer.stats.to_dict()})
        atomic_write_json(out / STATE, state)

    try:
        for results in _ordered_map(_prepare, tasks, workers):
            for result in results:
                item = items[index]
                if result[0] == "skip":
                    where = str(item.path) if item.path else item.key
                    split_state["skipped"].append({"index": index, "path": where, "reason": result[1]})
                    if warned < 20:
                        console.warn(f"skipped {where}: {result[1]}")
                    warned += 1
                else:
                    _, ext, data, size, channels, sums, sumsqs, pixels = result
                    extra = _ShardWriter.sample_size(data, item.label)
                    if writer is not None and (writer.count >= opts.max_count or writer.size_with(extra) > opts.max_size):
                        finish(index)
                        writer = None
                    if writer is None:
                        writer = _ShardWriter(out / f"{name}-{len(split_state['shards']):06d}.tar")
                    writer.add(item.key, ext, data, item.label)
                    writer.stats.add(size, channels, sums, sumsqs, pixels)
                    n_ok += 1
                index += 1
            bar.advance(task, len(results))
        if writer is not None:
            finish(len(items))
            writer = None
    finally:
        if writer is not None:
            writer.abort()
    split_state["done"] = True
    atomic_write_json(out / STATE, state)
    if warned > 20:
        console.warn(f"... {warned - 20} more skipped input(s); all are listed in {out / MANIFEST}")
    return n_ok, warned


def _manifest(src: Source, opts: Options, fingerprint: str, splits: dict, state: dict) -> dict:
    per_split, skipped = {}, []
    stats = {}
    for name in splits:
        s = state["splits"][name]
        per_split[name] = {
            "count": sum(sh["count"] for sh in s["shards"]),
            "shards": [{k: sh[k] for k in ("name", "count", "bytes", "sha256")} for sh in s["shards"]],
            "skipped": len(s["skipped"]),
        }
        skipped += [{"path": k["path"], "reason": k["reason"], "split": name} for k in s["skipped"]]
        stats[name] = Stats()
        for sh in s["shards"]:
            stats[name].merge(Stats(sh["stats"]))
    if not any(v["count"] for v in per_split.values()):
        raise UserError(f"{src.path}: no readable images (all {len(skipped)} inputs were skipped; see the warnings)")
    stats_split = "train" if per_split.get("train", {}).get("count") else next(n for n, v in per_split.items() if v["count"])
    channels = max(s.channels for s in stats.values())
    train_stats = stats[stats_split]
    mean, std = train_stats.mean_std(channels)
    return {
        "format": FORMAT,
        "version": VERSION,
        "source": src.describe(),
        "options": asdict(opts),
        "fingerprint": fingerprint,
        "labelled": src.classes is not None,
        "classes": src.classes,
        "channels": channels,
        "image_size": train_stats.common_size(),
        "mean": mean,
        "std": std,
        "stats_split": stats_split,
        "splits": per_split,
        "skipped": skipped,
        "provenance": provenance({k: v for k, v in src.inputs.items()}),
    }


def _remove_stale_shards(out: Path, manifest: dict) -> None:
    """Shards of an earlier, longer attempt that the finished manifest does not list."""
    listed = {sh["name"] for s in manifest["splits"].values() for sh in s["shards"]}
    for p in out.iterdir():
        if _SHARD_NAME.match(p.name) and p.name not in listed:
            p.unlink()


def _summary(manifest: dict, n_new: int, elapsed: float) -> None:
    if console.is_quiet():
        return
    from rich.table import Table

    table = Table(title=f"shards: {manifest['source']['kind']} source {manifest['source']['path']}")
    for col in ("split", "images", "shards", "MB", "skipped"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for name, s in manifest["splits"].items():
        mb = sum(sh["bytes"] for sh in s["shards"]) / 2**20
        table.add_row(name, f"{s['count']:,}", str(len(s["shards"])), f"{mb:,.1f}", str(s["skipped"]))
    console.console.print(table)
    classes = manifest["classes"]
    console.log(
        f"{'%d classes' % len(classes) if classes else 'unlabelled'}, {manifest['channels']} channel(s), "
        f"most common size {manifest['image_size']}, mean {manifest['mean']}, std {manifest['std']}"
    )
    if n_new:
        console.log(f"wrote {n_new:,} images in {elapsed:.1f} s ({n_new / max(elapsed, 1e-9):,.0f} images/s)")
    else:
        console.log("all shards were already complete and verified")
