"""`sslctl inspect PATH`: what an sslctl artifact is and where it came from.

One small function per artifact kind reads only metadata (manifests, safetensors headers,
recipe.toml, metrics.jsonl; never a checkpoint's tensors) and returns a `Description`: the
one-line JSON summary for stdout and the rows of a table for stderr. To add a kind, write a
`_describe_<kind>(path) -> Description | None` (None: "not mine") and list it in DESCRIBERS.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from sslctl.errors import UserError


@dataclass
class Description:
    kind: str
    summary: dict  # printed on stdout as one JSON line
    rows: list[tuple[str, str]] = field(default_factory=list)  # (field, value) for the table
    tables: list = field(default_factory=list)  # extra rich tables (per split, ...)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return ""


def _provenance_rows(prov: dict) -> list[tuple[str, str]]:
    rows = [("made by", f"sslctl {prov.get('sslctl_version', '?')}: {prov.get('command', '?')}")]
    for role, inp in (prov.get("inputs") or {}).items():
        rows.append((f"input {role}", f"{inp['path']} (sha256 {inp['sha256'][:12]}...)"))
    return rows


# ---------------------------------------------------------------- shards

def _describe_shards(path: Path) -> Description | None:
    """sslctl shards (their manifest), or a data index file (`data-index-*.json` in a run)."""
    file = path / "manifest.json" if path.is_dir() else path
    if not (file.is_file() and file.suffix == ".json"):
        return None
    from sslctl.datasets import open_dataset

    return _describe_dataset(open_dataset(file))


def _describe_dataset(m: dict) -> Description:
    """What open_dataset returned: sslctl shards' manifest, or the index of foreign shards."""
    from rich.table import Table

    kind = "shards" if m.get("format") == "sslctl-shards" else "webdataset"
    classes = m["classes"]
    splits = {name: {"count": s["count"], "shards": len(s["shards"]),
                     "bytes": None if any(sh.get("bytes") is None for sh in s["shards"]) else sum(sh["bytes"] for sh in s["shards"]),
                     "skipped": s.get("skipped", 0)} for name, s in m["splits"].items()}
    summary = {
        "kind": kind, "path": m["path"], "splits": splits, "labelled": m["labelled"],
        "num_classes": len(classes) if classes else None, "channels": m["channels"], "image_size": m["image_size"],
        "mean": m["mean"], "std": m["std"], "skipped": len(m["skipped"]), "source": m.get("source"),
    }
    rows = [
        ("source", f"{m['source']['kind']} {m['source']['path']}" if m.get("source") else "?"),
        ("classes", f"{len(classes)}: {', '.join(classes[:12])}{' ...' if len(classes) > 12 else ''}" if classes else "unlabelled"),
        ("channels", str(m["channels"])),
        ("image size", "x".join(map(str, m["image_size"] or [])) + " (most common)"),
        (f"mean ({m.get('stats_split', 'train')})", ", ".join(f"{x:.4f}" for x in m["mean"])),
        (f"std ({m.get('stats_split', 'train')})", ", ".join(f"{x:.4f}" for x in m["std"])),
    ]
    if kind == "shards":
        rows.append(("options", ", ".join(f"{k}={v}" for k, v in (m.get("options") or {}).items())))
    else:
        rows += [("labels from", str(m.get("label_key") or "none found")), ("statistics from", f"the first {m['stats_images']} images")]
    rows.append(("skipped", str(len(m["skipped"]))))
    rows += [(" ", f"{s['path']}: {s['reason']}") for s in m["skipped"][:10]]
    if len(m["skipped"]) > 10:
        rows.append((" ", f"... and {len(m['skipped']) - 10} more"))
    if kind == "shards" or m.get("provenance"):
        rows += _provenance_rows(m.get("provenance", {}))
    table = Table(title="splits")
    for col in ("split", "images", "shards", "size", "skipped"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for name, s in splits.items():
        size = _fmt_bytes(s["bytes"]) if s["bytes"] is not None else "?"
        table.add_row(name, f"{s['count']:,}", str(s["shards"]), size, str(s["skipped"]))
    return Description(kind, summary, rows, [table])


# ---------------------------------------------------------------- safetensors: encoder, features

def _safetensors_header(path: Path) -> tuple[dict, dict] | None:
    """(metadata, {tensor: shape}) from the file's JSON header alone (8-byte little-endian length,
    then JSON), without loading torch or any tensor; None if not a .safetensors file."""
    if not (path.is_file() and path.suffix == ".safetensors"):
        return None
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= min(path.stat().st_size - 8, 100 * 2**20):
                raise ValueError(f"header length {size} does not fit the file")
            header = json.loads(f.read(size))
        meta = header.pop("__metadata__", None) or {}
        return meta, {name: list(t["shape"]) for name, t in header.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"{path}: not a readable safetensors file ({err})") from None


def _describe_encoder(path: Path) -> Description | None:
    header = _safetensors_header(path)
    if header is None or header[0].get("format") != "sslctl-encoder":
        return None
    from sslctl.encoder_io import read_metadata

    meta = read_metadata(path)
    params = sum(_numel(s) for s in header[1].values())
    summary = {"kind": "encoder", "path": str(path.resolve()), **{k: v for k, v in meta.items() if k != "provenance"},
               "tensors": len(header[1]), "parameters": params}
    rows = [(k.replace("_", " "), str(v)) for k, v in meta.items() if k != "provenance"]
    rows += [("tensors", f"{len(header[1])} ({params:,} values)"), ("size", _fmt_bytes(path.stat().st_size))]
    rows += _provenance_rows(meta["provenance"])
    return Description("encoder", summary, rows)


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _describe_features(path: Path) -> Description | None:
    header = _safetensors_header(path)
    if header is None or header[0].get("format") != "sslctl-features":
        return None
    meta, shapes = header
    splits = {}
    for name, shape in shapes.items():
        split, _, what = name.rpartition(".")
        if what == "features":
            splits.setdefault(split, {})["n"], splits.setdefault(split, {})["dim"] = shape[0], shape[1] if len(shape) > 1 else 1
    decoded = {k: _maybe_json(v) for k, v in meta.items() if k != "format"}
    summary = {"kind": "features", "path": str(path.resolve()),
               **{k: v for k, v in decoded.items() if k != "provenance"}, "splits": splits}
    rows = [(f"split {s}", f"{v['n']:,} x {v['dim']}") for s, v in splits.items()]
    rows += [(k, v if isinstance(v, str) else json.dumps(v)) for k, v in decoded.items() if k not in ("provenance", "splits")]
    rows += _provenance_rows(decoded.get("provenance") or {})
    return Description("features", summary, rows)


def _maybe_json(value: str):
    try:
        return json.loads(value)
    except ValueError:
        return value


# ---------------------------------------------------------------- run directory (pretrain)

def _describe_run(path: Path) -> Description | None:
    if not path.is_dir() or not any((path / n).exists() for n in ("recipe.toml", "checkpoints", "metrics.jsonl")):
        return None
    summary: dict = {"kind": "run", "path": str(path.resolve())}
    rows = []
    recipe_file = path / "recipe.toml"
    if recipe_file.is_file():
        try:
            recipe = tomllib.loads(recipe_file.read_text())
        except tomllib.TOMLDecodeError as err:
            raise UserError(f"{recipe_file}: not valid TOML ({err})") from None
        info = recipe.get("recipe", {})
        summary["recipe"] = {"name": info.get("name"), "method": info.get("method"),
                             "encoder": recipe.get("encoder", {}).get("name"),
                             "epochs": recipe.get("schedule", {}).get("epochs"),
                             "batch_size": recipe.get("optim", {}).get("batch_size")}
        rows += [(f"recipe {k}", str(v)) for k, v in summary["recipe"].items() if v is not None]
    ckpt = path / "checkpoints" / "last.pt"
    if ckpt.is_file():  # not loaded: inspecting must stay cheap and never unpickle
        summary["checkpoint"] = {"path": str(ckpt), "bytes": ckpt.stat().st_size}
        rows.append(("checkpoint", f"{ckpt} ({_fmt_bytes(ckpt.stat().st_size)})"))
    metrics = path / "metrics.jsonl"
    if metrics.is_file():
        records = []
        for line in metrics.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                break  # a line cut short by a kill
        summary["metrics"] = {"records": len(records), "last": records[-1] if records else None}
        rows.append(("metrics", f"{len(records)} records"))
        if records:
            rows.append(("last record", ", ".join(f"{k}={v}" for k, v in records[-1].items())))
    encoder = path / "encoder.safetensors"
    if encoder.is_file():
        enc = _describe_encoder(encoder)
        if enc is not None:
            summary["encoder"] = {k: v for k, v in enc.summary.items() if k != "kind"}
            rows.append(("encoder", f"{encoder} ({enc.summary['arch']}, {enc.summary['feature_dim']}-d)"))
    return Description("run", summary, rows)


DESCRIBERS = [_describe_shards, _describe_run, _describe_encoder, _describe_features]


def describe(path: str | Path, *, label_key: str | None = None) -> Description:
    """The Description of the artifact at `path`, or of the WebDataset a spec names (a
    directory of .tar shards, a pattern, URLs: indexed in memory, nothing written);
    UserError if it is none of these."""
    from sslctl.shardfmt import is_url

    spec = os.fspath(path)
    if is_url(spec) or "{" in spec or "::" in spec:
        return _describe_dataset(_open_foreign(spec, label_key))
    path = Path(spec)
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    for describer in DESCRIBERS:
        found = describer(path)
        if found is not None:
            return found
    if path.is_file() and path.suffix == ".tar" or path.is_dir() and next(path.rglob("*.tar"), None):
        return _describe_dataset(_open_foreign(spec, label_key))
    raise UserError(
        f"{path}: not an sslctl artifact (expected a shards directory or manifest.json, a run directory, "
        "an encoder.safetensors or a features .safetensors) nor a directory of .tar shards"
    )


def _open_foreign(spec: str, label_key: str | None) -> dict:
    from sslctl.datasets import open_dataset

    return open_dataset(spec, label_key=label_key)


def render(desc: Description, path: Path) -> None:
    """The description as rich tables on stderr."""
    from rich.table import Table

    from sslctl import console

    table = Table(title=f"{desc.kind}: {path}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in desc.rows:
        table.add_row(key, value)
    console.console.print(table)
    for extra in desc.tables:
        console.console.print(extra)
