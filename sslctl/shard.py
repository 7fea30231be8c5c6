"""`sslctl shard SRC OUT`: a dataset source -> WebDataset tar shards + manifest.json (DESIGN.md §1).

    OUT/train-000000.tar ...   per sample KEY.png|jpg|webp (+ KEY.cls, ASCII class index)
    OUT/manifest.json          counts, classes, per-shard bytes/sha256, mean/std, skipped inputs
    OUT/.sslctl-shard-state.json   progress journal: what resume trusts (after re-hashing)

The work per image (read, verify, statistics, optional re-encode, tar encoding) runs in a
process pool; the main process appends the results to the shards in a fixed order, so the
output does not depend on --workers. Fixed tar metadata (mtime 0, uid/gid 0, mode 0444) and a
seeded sample order make the shards byte-identical for the same input and flags.

Verification: every image file is decoded before it enters a shard, and what fails to decode
is skipped (a file stored as is: `_verify`, the cheapest whole decode). An image over --max-pixels (a decompression
bomb: a 600-byte JPEG can claim 60000 x 60000) is skipped from its header, before any pixel is
made. Mean/std weigh every image the same (`image_moments`) and come from raw arrays and a
seeded random sample of STATS_SAMPLE image files per split.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import random
import re
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from sslctl import console
from sslctl.artifacts import atomic_write_json, provenance, sha256_file
from sslctl.errors import UserError
from sslctl.lifetime import end_with_parent
from sslctl.shardfmt import (FORMAT, MANIFEST, MAX_PIXELS, SHARD_NAME, VERSION, ImageTooLarge, ShardWriter, Stats,
                             check_pixels, check_size, image_moments, shard_name, tar_members, write_manifest)
from sslctl.sources import Item, Source, open_source, standard_mode

STATE = ".sslctl-shard-state.json"
FORMATS = ("keep", "png", "jpg", "webp")
_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # formats stored as their original bytes
_SAVE = {"jpg": ("JPEG", {"quality": 95}), "png": ("PNG", {}), "webp": ("WEBP", {"quality": 95})}


@dataclass(frozen=True)
class Options:
    """Everything that changes the shards' bytes; recorded in the manifest, part of its fingerprint."""

    max_count: int = 10_000
    max_size: int = 512 * 2**20
    val_fraction: float = 0.0
    seed: int = 0
    max_side: int | None = None
    format: str = "keep"
    max_pixels: int = MAX_PIXELS


def parse_size(text: str | int) -> int:
    """'512MB', '1G', '300k', '1048576' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", str(text).lower())
    if not m:
        raise UserError(f"--max-size {text!r}: expected a size like 512MB, 1G or 1048576")
    return int(float(m[1]) * 1024 ** "_kmgt".index(m[2] or "_"))


# ---------------------------------------------------------------- the worker side

STATS_SAMPLE = 1_000  # image files per split decoded for mean/std: a seeded random sample (arrays: all)


def _prepare(task: tuple[list, int, int | None, str, int]) -> list[tuple]:
    """Read, verify, (if asked) re-encode and tar-encode a chunk of (key, label, payload), in a
    pool worker: the main process only appends the returned tar members to the shard.

    Each result is ("ok", tar members, (h, w), channels, moments) or ("skip", reason); the
    first `decode` items of the chunk are fully decoded for their pixel moments."""
    items, decode, max_side, fmt, max_pixels = task
    results = []
    for i, (key, label, payload) in enumerate(items):
        result = _prepare_one(payload, i < decode, max_side, fmt, max_pixels)
        if result[0] == "ok":
            _, ext, data, *info = result
            result = ("ok", tar_members(key, ext, data, label), *info)
        results.append(result)
    return results


def _prepare_one(payload, decode: bool, max_side: int | None, fmt: str, max_pixels: int) -> tuple:
    data, original = None, None
    if isinstance(payload, np.ndarray):
        img = Image.fromarray(payload)
    else:
        try:
            with open(payload, "rb", buffering=0) as f:
                data = f.readall()
        except OSError as err:
            return ("skip", f"unreadable: {err.strerror or err}")
        if not data:
            return ("skip", "empty file (0 bytes)")
        header = _complete_header(data)
        hint = "raise --max-pixels to keep it"
        try:
            if header and not decode and fmt in ("keep", header[0]) and (not max_side or max(header[1]) <= max_side):
                (height, width), ext = header[1], header[0]
                check_size(width, height, max_pixels, hint)
                _verify(data, ext)
                return ("ok", ext, data, header[1], header[2], None)  # stored as is
            check_pixels(data, max_pixels, hint)
            img = Image.open(io.BytesIO(data))
            original = img.format
            img.load()
        except UnidentifiedImageError:
            return ("skip", "not an image (unrecognised file format)")
        except ImageTooLarge as err:
            return ("skip", str(err))
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            return ("skip", f"corrupt or truncated image: {str(err).splitlines()[0]}")
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
    return ("ok", ext, data, (img.height, img.width), len(img.getbands()), image_moments(img))


def _verify(data: bytes, ext: str) -> None:
    """Decode all of a file that is stored as is, raising when it does not decode; a JPEG at 1/8
    scale (libjpeg's DCT scaling: all of its entropy-coded data, a fraction of the pixel work
    for large images). PIL, not torchvision's faster decoders: importing torchvision would cost
    the stage more than it saves below ~100k images."""
    img = Image.open(io.BytesIO(data))
    if ext == "jpg":
        img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
    img.load()


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _complete_header(data: bytes) -> tuple[str, tuple[int, int], int] | None:
    """(ext, (h, w), channels) of an 8-bit JPEG or PNG that is structurally whole: its header
    parses and it ends with its end marker (JPEG EOI, PNG IEND), which a truncated file lacks.
    None when unsure (other formats, palettes, 16 bits, trailing bytes): then a full decode decides."""
    if data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9":
        i = 2
        while i + 9 < len(data) and data[i] == 0xFF:
            marker, length = data[i + 1], int.from_bytes(data[i + 2 : i + 4], "big")
            if marker in _SOF:
                h, w, comps = int.from_bytes(data[i + 5 : i + 7], "big"), int.from_bytes(data[i + 7 : i + 9], "big"), data[i + 9]
                return ("jpg", (h, w), 1 if comps == 1 else 3) if data[i + 4] == 8 and comps in (1, 3) and h and w else None
            i += 2 + length
        return None
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and data[-8:] == b"IEND\xaeB`\x82":
        w, h, depth, colour = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"), data[24], data[25]
        channels = {0: 1, 4: 1, 2: 3, 6: 3}.get(colour)  # gray, gray+alpha -> L; RGB, RGBA -> RGB
        return ("png", (h, w), channels) if depth == 8 and channels and h and w else None
    return None


def _ordered_map(fn, tasks: list, workers: int):
    """fn over tasks in order, `workers` processes, a bounded number of tasks in flight."""
    if workers <= 1:
        yield from map(fn, tasks)
        return
    with ProcessPoolExecutor(workers, initializer=end_with_parent) as pool:
        pending = collections.deque()
        for task in tasks:
            pending.append(pool.submit(fn, task))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


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
    order = {"train": 0, "val": 1, "test": 2}
    return dict(sorted(splits.items(), key=lambda kv: (order.get(kv[0], 3), kv[0])))


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
    if warned > 20:
        console.warn(f"... {warned - 20} more skipped input(s); all are listed in {out / MANIFEST}")

    manifest_path = out / MANIFEST
    manifest = _manifest(src_obj, opts, fingerprint, splits, state)
    existing = _load_json(manifest_path)
    if existing is None or {k: v for k, v in existing.items() if k != "provenance"} != {
        k: v for k, v in manifest.items() if k != "provenance"
    }:
        write_manifest(out, manifest)
    _remove_stale_shards(out, manifest)
    _summary(manifest, done_now, elapsed)
    return manifest_path


def _write_split(out, name, items, resume, split_state, state, opts, workers, bar, task, warned):
    """Shard items[resume:] of one split; journal every finished shard so a kill loses at most one."""
    todo = items[resume:]
    chunk = max(8, min(256, len(todo) // (workers * 8) or 8))
    tasks = [([(it.key, it.label, it.array if it.path is None else it.path) for it in todo[i : i + chunk]],
              max(0, STATS_SAMPLE - resume - i), opts.max_side, opts.format, opts.max_pixels) for i in range(0, len(todo), chunk)]
    writer, stats, index, n_ok = None, None, resume, 0

    def finish(end: int) -> None:
        record = writer.close()
        split_state["shards"].append({**record, "end": end, "stats": stats.to_dict()})
        split_state["done"] = end == len(items)
        atomic_write_json(out / STATE, state)

    try:
        for results in _ordered_map(_prepare, tasks, workers):
            for result in results:
                item = items[index]
                if result[0] == "skip":
                    where = item.path or item.key
                    split_state["skipped"].append({"index": index, "path": where, "reason": result[1]})
                    if warned < 20:
                        console.warn(f"skipped {where}: {result[1]}")
                    warned += 1
                else:
                    _, members, size, channels, moments = result
                    if writer is not None and (writer.count >= opts.max_count or writer.size_with(members) > opts.max_size):
                        finish(index)
                        writer = None
                    if writer is None:
                        writer, stats = ShardWriter(out / shard_name(name, len(split_state["shards"]))), Stats()
                    writer.add_members(members)
                    stats.add(size, channels, moments)
                    n_ok += 1
                index += 1
            bar.advance(task, len(results))
        if writer is not None:
            finish(len(items))
            writer = None
    finally:
        if writer is not None:
            writer.abort()
    if not split_state["done"]:  # the split ended with skipped inputs after its last shard
        split_state["done"] = True
        atomic_write_json(out / STATE, state)
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
        "stats_images": train_stats.decoded,  # images whose pixels gave mean/std (<= STATS_SAMPLE)
        "splits": per_split,
        "skipped": skipped,
        "provenance": provenance({k: v for k, v in src.inputs.items()}),
    }


def _remove_stale_shards(out: Path, manifest: dict) -> None:
    """Shards of an earlier, longer attempt that the finished manifest does not list."""
    listed = {sh["name"] for s in manifest["splits"].values() for sh in s["shards"]}
    for p in out.iterdir():
        if SHARD_NAME.match(p.name) and p.name not in listed:
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
