"""Opening a dataset spec: sslctl's own shards, or any WebDataset, on local disk or remote.

    open_dataset(spec, *, index_dir=None, label_key=None) -> a dict in the manifest's shape

A spec is any of:
    SHARDS_DIR | SHARDS_DIR/manifest.json     shards made by `sslctl shard` (their manifest)
    DIR                                        a directory of .tar shards without a manifest
    data/train-{000000..000099}.tar            a brace pattern; 'a.tar::b.tar' lists several
    http(s)://, s3://, gs://, pipe:CMD         URLs of shards (patterns too); URL/manifest.json
                                               is sslctl shards served remotely
    {"train": SPEC, "test": SPEC}              one source per split

What comes back is what the stages read from a manifest: "splits" (each shard's location and
sample count), "classes", "labelled", "mean"/"std", "image_size", "channels", "source" (what
it is, for provenance), "fingerprint", "path" (a file that records it: the manifest, or for
foreign shards the index; the spec itself for an index kept in memory). For foreign shards that needs one pass over the data (the index):
sample counts and label values from every shard, pixel statistics from the first
STATS_SAMPLE images. The index is written to `index_dir` (the run or features directory)
as data-index-HASH.json and reused from there; nothing is written where the data is.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Mapping

from sslctl import console
from sslctl.errors import UserError
from sslctl.shardfmt import (MANIFEST, LabelKey, ShardError, Stats, image_ext, image_moments, is_image, is_url,
                             load_manifest, split_shards, validate_manifest)
from sslctl.streams import ShardStream, expand, list_tars, shard_samples

INDEX_FORMAT, INDEX_VERSION = "sslctl-index", 1
STATS_SAMPLE = 1_000  # images decoded for mean/std without a manifest: the first ones of the stats split
IMAGENET_NOTICE = "no image of {what} could be decoded for statistics; normalising with ImageNet's mean/std"
_SPLIT_PREFIX = re.compile(r"^(train|val|valid|validation|test)(?=[-_./]|$)")


def open_dataset(spec, *, index_dir: str | os.PathLike | None = None, label_key: str | None = None,
                 threads: int = 8) -> dict:
    """The dataset a spec names, as a manifest-shaped dict (see the module's docstring).

    index_dir: where the index of foreign shards is cached (None: built in memory, not kept).
    label_key: which member holds the label (EXT, or EXT:FIELD of a JSON member): default cls,
    or for a cached index the key it was made with."""
    if isinstance(spec, dict) and "splits" in spec:
        return spec  # already opened
    if isinstance(spec, (list, tuple)):
        spec = "::".join(map(os.fspath, spec))
    if not isinstance(spec, Mapping):
        spec = os.fspath(spec)
        own = _sslctl_manifest(spec, index_dir)
        if own is not None:
            if label_key not in (None, own.get("label_key") or "cls"):
                raise UserError(f"--label-key {label_key}: {own['path']} already says where its labels are "
                                f"({own.get('label_key') or 'cls'}); drop --label-key")
            return own
        sources = _splits_of(spec)
    else:
        sources = {str(split): _split_locations(str(split), os.fspath(s)) for split, s in spec.items()}
    LabelKey(label_key)  # UserError for a malformed key, before any reading
    key = _index_key(sources)
    index_file = Path(index_dir) / f"data-index-{key[:12]}.json" if index_dir is not None else None
    if index_file is None:
        return _build(spec, sources, label_key, key, threads)
    index_file.parent.mkdir(parents=True, exist_ok=True)
    with _locked(index_file.parent):  # one process (rank, launcher) indexes; the others wait, then read it
        cached = _load_index(index_file, key, label_key)
        if cached is None:
            cached = _build(spec, sources, label_key, key, threads)
            _save(index_file, cached)
    return cached


@contextlib.contextmanager
def _locked(directory: Path):
    """An exclusive flock on `directory` (processes on one machine, or on a shared filesystem
    that supports it); where locking is not supported, no lock: each process indexes."""
    import fcntl

    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


# ---------------------------------------------------------------- what a spec names

def _sslctl_manifest(spec: str, index_dir) -> dict | None:
    """The dataset when the spec already describes one: sslctl shards (local, or a URL of
    their manifest.json, copied into index_dir for provenance) or a saved index file."""
    if is_url(spec):
        if not spec.endswith("/" + MANIFEST):
            return None
        manifest = _remote_manifest(spec)
        if index_dir is not None:
            _save(Path(index_dir) / f"data-manifest-{hashlib.sha256(spec.encode()).hexdigest()[:12]}.json", manifest)
        return manifest
    path = Path(spec)
    if path.is_dir() and (path / MANIFEST).is_file():
        return load_manifest(path)
    if path.is_file() and path.suffix == ".json":
        try:
            index = json.loads(path.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            index = None
        if isinstance(index, dict) and index.get("format") == INDEX_FORMAT:
            return {**index, "path": str(path.resolve())}
        return load_manifest(path)  # UserError for anything else
    return None


def _remote_manifest(url: str) -> dict:
    """sslctl shards served over http/s3/...: the manifest, each shard's URL beside it."""
    try:
        with ShardStream(url) as f:
            text = b"".join(iter(lambda: f.read(1 << 20), b""))
        manifest = json.loads(text)
    except ShardError as err:
        raise UserError(f"{url}: cannot read the manifest ({err.reason})") from None
    except ValueError as err:
        raise UserError(f"{url}: not valid JSON ({err})") from None
    validate_manifest(manifest, url)
    base = url.rsplit("/", 1)[0]
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            entry["url"] = f"{base}/{entry['name']}"
    manifest["path"] = url
    return manifest


def _locations(spec: str) -> list[str]:
    """The shard locations of one source: a directory's .tar files, a pattern's or list's names,
    a URL; local paths made absolute (the index is reused from other working directories)."""
    if "::" in spec or "{" in spec:
        return [loc if is_url(loc) else os.path.abspath(loc) for loc in expand(spec)]
    if is_url(spec):
        return list_tars(spec) if spec.endswith("/") else [spec]
    path = Path(spec)
    if path.is_dir():
        tars = sorted(path.glob("*.tar")) or sorted(path.rglob("*.tar"))
        if not tars:
            raise UserError(f"{path / MANIFEST}: no shards manifest here, nor .tar shards in {path}; make shards with "
                            "`sslctl shard SRC OUT` and pass OUT, or pass a directory of WebDataset .tar shards")
        return [str(p.absolute()) for p in tars]
    if path.is_file():
        return [os.path.abspath(spec)]
    raise UserError(f"{spec}: no such file or directory, so no shards manifest or .tar shards here; pass the OUT of "
                    "`sslctl shard`, a directory of .tar shards, a pattern like data/train-{000000..000009}.tar, or a URL")


def _split_locations(split: str, spec: str) -> list[str]:
    """One split's shards given its own source; for sslctl shards, their split of that name."""
    own = _sslctl_manifest(spec, None)
    return _locations(spec) if own is None else [str(loc) for loc in split_shards(own, split)]


def _splits_of(spec: str) -> dict[str, list[str]]:
    """One split ("train"), or, for a directory whose shards are all named train-*/val-*/test-*
    (or sit in such subdirectories), those splits."""
    locations = _locations(spec)
    path = Path(spec)
    if is_url(spec) or not path.is_dir():
        return {"train": locations}
    names = [Path(loc).relative_to(path.absolute()).as_posix() for loc in locations]
    found = [_SPLIT_PREFIX.match(n) for n in names]
    if len(locations) > 1 and all(found) and len({m.group(1) for m in found}) > 1:
        splits: dict[str, list[str]] = {}
        for m, loc in zip(found, locations):
            splits.setdefault({"valid": "val", "validation": "val"}.get(m.group(1), m.group(1)), []).append(loc)
        order = {"train": 0, "val": 1, "test": 2}
        return dict(sorted(splits.items(), key=lambda kv: order[kv[0]]))
    return {"train": locations}


def describe(spec) -> str:
    if isinstance(spec, Mapping):
        return " ".join(f"{k}={v}" for k, v in spec.items())
    return str(spec)


# ---------------------------------------------------------------- the index

def _index_key(sources: dict) -> str:
    record = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "splits": sources}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _identity(location: str) -> dict:
    """What tells that a local shard changed since it was indexed (remote ones are trusted)."""
    if is_url(location):
        return {}
    try:
        st = os.stat(location)
    except OSError:
        return {"missing": True}
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _load_index(file: Path | None, key: str, label_key: str | None) -> dict | None:
    """The cached index of these sources, unless a local shard changed or other labels are asked for."""
    if file is None or not file.is_file():
        return None
    try:
        index = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    if index.get("format") != INDEX_FORMAT or index.get("key") != key:
        return None
    if label_key is not None and LabelKey(label_key).key != index.get("labels_from"):
        return None
    for split in index["splits"].values():
        for entry in split["shards"]:
            if entry.get("identity", {}) != _identity(entry["url"]):
                console.log(f"{entry['url']} changed since {file} was written; indexing again")
                return None
    index["path"] = str(file.resolve())
    return index


def _save(file: Path, index: dict) -> None:
    from sslctl.artifacts import atomic_write_json

    atomic_write_json(file, {k: v for k, v in index.items() if k != "path"})
    index["path"] = str(file.resolve())


def _scan(location: str, label: LabelKey, stats: Stats | None = None) -> dict:
    """One pass over a shard: its sample count, the label values it holds, where it broke;
    with `stats`, the pixels of its images too until it holds STATS_SAMPLE images."""
    values: collections.Counter = collections.Counter()
    count, error = 0, None

    def load(ext: str) -> bool:
        return ext == label.ext or (stats is not None and stats.decoded < STATS_SAMPLE and is_image(ext))

    try:
        for sample in shard_samples(location, load=load):
            count += 1
            value = label.value(sample)
            if value is not None:
                values[value] += 1
            if stats is not None and stats.decoded < STATS_SAMPLE:
                _add_pixels(stats, sample)
    except ShardError as err:
        error = err.reason
    identity = _identity(location)
    entry = {"name": location.rstrip("/").rsplit("/", 1)[-1], "url": location, "count": count,
             "bytes": identity.get("size"), "identity": identity, "labels": dict(values)}
    if error:
        entry["error"] = error
    return entry


def _add_pixels(stats: Stats, sample: dict) -> None:
    from PIL import Image

    from sslctl.sources import standard_mode

    try:
        img = Image.open(io.BytesIO(sample[image_ext(sample)]))
        img.load()
    except Exception:  # noqa: BLE001 - a corrupt image: the loader replaces it too
        return
    img = standard_mode(img)
    stats.add((img.height, img.width), len(img.getbands()), image_moments(img))


def _build(spec, sources: dict[str, list[str]], label_key: str | None, key: str, threads: int) -> dict:
    """Index every shard: the stats split's first shards in order (their pixels give mean/std),
    the others in parallel (threads: remote shards are mostly waiting on the network)."""
    label, what = LabelKey(label_key), describe(spec)
    flat = [(split, loc) for split, locs in sources.items() for loc in locs]
    stats_split = "train" if "train" in sources else next(iter(sources))
    console.log(f"indexing {len(flat)} shard(s) of {what} (sample counts, labels, statistics): once, then cached")
    stats, entries = Stats(), [None] * len(flat)
    with console.progress() as bar, ThreadPoolExecutor(max(1, min(threads, len(flat)))) as pool:
        task = bar.add_task("index", total=len(flat))
        for i, (split, loc) in enumerate(flat):
            if split != stats_split or stats.decoded >= STATS_SAMPLE:
                continue
            entries[i] = _scan(loc, label, stats)
            bar.advance(task)
        todo = [i for i, e in enumerate(entries) if e is None]
        for i, entry in zip(todo, pool.map(lambda i: _scan(flat[i][1], label), todo)):
            entries[i] = entry
            bar.advance(task)
    per_split: dict = {split: [] for split in sources}
    for (split, _), entry in zip(flat, entries):
        per_split[split].append(entry)
    skipped = [{"path": e["url"], "reason": e["error"], "split": split, "samples_read": e["count"]}
               for split, es in per_split.items() for e in es if "error" in e]
    for s in skipped[:20]:
        kept = f"its first {s['samples_read']} sample(s) are used" if s["samples_read"] else "skipped"
        console.warn(f"{s['path']}: {s['reason']}; {kept}")
    if len(skipped) > 20:
        console.warn(f"... and {len(skipped) - 20} more unreadable shard(s); all are listed in the index")
    for split, es in per_split.items():
        if not sum(e["count"] for e in es):
            bad = next((e for e in es if "error" in e), None)
            where = bad["url"] if bad else es[0]["url"]
            reason = bad["error"] if bad else "no samples with an image (.jpg/.jpeg/.png/.webp)"
            raise UserError(f"{where}: {reason}; split {split!r} of {what} has no readable samples")

    values = collections.Counter()
    for e in entries:
        values.update(e["labels"])
    classes, names = _classes(values)
    decoded = stats.decoded
    if decoded:
        channels = stats.channels
        mean, std = stats.mean_std(channels)
    else:
        from sslctl.augment import IMAGENET_MEAN, IMAGENET_STD

        console.warn(IMAGENET_NOTICE.format(what=what))
        channels, mean, std = 3, list(IMAGENET_MEAN), list(IMAGENET_STD)
    splits = {split: {"count": sum(e["count"] for e in es), "skipped": sum("error" in e for e in es),
                      "shards": [{k: v for k, v in e.items() if k != "labels"} for e in es if e["count"]]}
              for split, es in per_split.items()}  # shards with no readable sample are only in "skipped"
    fingerprint = hashlib.sha256(json.dumps(
        {"key": key, "counts": [[e["url"], e["count"], e["bytes"]] for e in entries]}, sort_keys=True).encode()).hexdigest()
    return {
        "format": INDEX_FORMAT, "version": INDEX_VERSION, "key": key,
        "source": {"kind": "webdataset", "path": what, "shards": len(flat)},
        "labels_from": label.key, "label_key": label.key if values else None,
        "labelled": bool(values), "classes": classes, "label_names": names,
        "channels": channels, "image_size": stats.common_size(), "mean": mean, "std": std,
        "stats_split": stats_split, "stats_images": decoded,
        "splits": splits, "skipped": skipped, "fingerprint": fingerprint, "path": what,  # the index file's once saved
    }


def _classes(values: collections.Counter) -> tuple[list[str] | None, bool]:
    """Class names from the label values found: 0..max for integers, else the sorted names
    (then a sample's label is its name's position)."""
    if not values:
        return None, False
    if all(re.fullmatch(r"\d+", v) for v in values):
        return [str(i) for i in range(max(int(v) for v in values) + 1)], False
    return sorted(values), True
