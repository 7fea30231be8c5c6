"""`sslctl embed`: a frozen encoder + shards -> one features file (DESIGN.md §1, docs/spec/protocols.md E1).

The features file is safetensors with `SPLIT.features` (N x D) and `SPLIT.labels` (N, int64,
-1 when the shards are unlabelled) per split, rows in the shards' stored order, and metadata
(str -> str, JSON where structured):
    format="sslctl-features", version, splits, encoder (what was embedded), layer,
    shards (manifest path + sha256), classes, input_size, normalization (mean, std, source),
    bf16, provenance

Work is per shard (`embed_shards`, `embed_shard`): each finished shard is saved to a sidecar
folder FEATS.parts/, so an interrupted run continues with the shards it has not done yet; the
parts are assembled into FEATS at the end and removed. A part is reused only when its
fingerprint (encoder weights, layer, transform, precision, the shard's sha256) matches.
DataLoader workers decode whole shards in parallel; the main process runs the model.

Distributed (torchrun, or `sslctl embed --nproc N`): the shards still to do are dealt to the
ranks round-robin, each rank writes its parts, and rank 0 assembles the same FEATS as one process
would (rows in the shards' stored order) once every rank is done.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sslctl import console
from sslctl.artifacts import provenance, save_safetensors, sha256_file
from sslctl.errors import UserError
from sslctl.predict import predict

FORMAT, VERSION = "sslctl-features", 1
LAYERS = ("backbone", "projector")
NORMALIZE = ("auto", "encoder", "manifest", "imagenet")


# ------------------------------------------------------------------------- the encoder side


@dataclass
class Encoder:
    """A frozen feature extractor and what the evaluation transform needs to feed it."""

    model: nn.Module  # images B x 3 x S x S (normalised) -> features B x D
    input_size: int
    mean: list[float] | None  # the normalisation it was trained with (None: not recorded)
    std: list[float] | None
    info: dict  # recorded in the features' metadata
    files: dict[str, Path] = field(default_factory=dict)  # hashed into provenance


class _Projected(nn.Module):
    """method.embed(x, "projector") as a module, so the loop treats both layers alike."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.embed(x, "projector")


def open_encoder(
    encoder: str | Path,
    *,
    layer: str = "backbone",
    weights: str | None = None,
    small_stem: bool | None = None,
    input_size: int | None = None,
    seed: int = 0,
) -> Encoder:
    """ENCODER as `sslctl embed` takes it: a run directory, an encoder.safetensors, or a
    torchvision model name with weights="random" (seeded: the floor a result is compared with).

    weights="random" with a run or encoder file re-initialises that same architecture."""
    from sslctl.encoder_io import read_metadata
    from sslctl.encoders import build_backbone

    if layer not in LAYERS:
        raise UserError(f"--layer {layer}: expected one of {', '.join(LAYERS)}")
    if weights not in (None, "random"):
        raise UserError(f"--weights {weights}: only 'random' is supported (sslctl never downloads weights)")
    path = Path(encoder)
    if path.is_dir():
        run, file = path, path / "encoder.safetensors"
        if not file.is_file():
            raise UserError(f"{path}: no encoder.safetensors in this run directory (has `sslctl pretrain` finished?)")
    elif path.is_file():
        run, file = path.parent, path
    elif "/" in str(encoder) or str(encoder).endswith((".safetensors", ".pt")):
        raise UserError(f"{encoder}: no such run directory or encoder file")
    else:  # a torchvision model name
        if weights != "random":
            raise UserError(f"{encoder}: a model name needs --weights random (or pass a run directory / encoder.safetensors)")
        if layer != "backbone":
            raise UserError("--layer projector needs a run directory (a bare model has no projector)")
        torch.manual_seed(seed)
        model = build_backbone(str(encoder), small_stem=bool(small_stem))
        size = input_size or (32 if small_stem else 224)
        info = {"arch": str(encoder), "small_stem": bool(small_stem), "weights": "random", "seed": seed}
        return Encoder(model, size, None, None, info)

    meta = read_metadata(file)  # UserError for a file sslctl did not write
    if small_stem is not None and small_stem != meta["small_stem"]:
        raise UserError(f"{file}: the encoder was trained with small_stem={meta['small_stem']}; drop --small-stem/--no-small-stem")
    info = {"path": str(file.resolve()), "arch": meta["arch"], "small_stem": meta["small_stem"], "recipe": meta["recipe"]}
    size = input_size or meta["input_size"]
    if weights == "random":
        torch.manual_seed(seed)
        model = build_backbone(meta["arch"], small_stem=meta["small_stem"], **meta.get("options", {}))
        info.update(weights="random", seed=seed)
        return Encoder(model, size, meta["mean"], meta["std"], info)
    if layer == "backbone":
        from sslctl.encoder_io import load_encoder

        model, _ = load_encoder(file)
        return Encoder(model, size, meta["mean"], meta["std"], info, {"encoder": file})
    return _projector_encoder(run, size, meta, info)


def _projector_encoder(run: Path, size: int, meta: dict, info: dict) -> Encoder:
    from sslctl import checkpoint
    from sslctl.methods import build_method
    from sslctl.recipes import load_recipe

    recipe, ckpt = run / "recipe.toml", checkpoint.checkpoint_path(run)
    for needed in (recipe, ckpt):
        if not needed.is_file():
            raise UserError(f"--layer projector needs the run directory's {needed.relative_to(run)}: {needed} is missing")
    method = build_method(load_recipe(recipe))
    state = checkpoint.load(ckpt)
    try:
        method.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as err:
        raise UserError(f"{ckpt}: its model state does not fit the method of {recipe} ({err})") from None
    if getattr(method, "projector", None) is None:
        raise UserError(f"{recipe}: method {type(method).__name__} has no projector; use --layer backbone")
    info.update(layer_source=str(ckpt.resolve()))
    return Encoder(_Projected(method), size, meta["mean"], meta["std"], info, {"checkpoint": ckpt, "recipe": recipe})


def resolve_normalization(how: str, enc: Encoder, manifest: dict) -> tuple[list[float], list[float], str]:
    """(mean, std, source). auto: what the encoder was trained with when it says so, else the
    shards' own statistics (a random-init floor sees the data normalised like a trained run)."""
    from sslctl.augment import IMAGENET_MEAN, IMAGENET_STD, normalization

    if how not in NORMALIZE:
        raise UserError(f"--normalize {how}: expected one of {', '.join(NORMALIZE)}")
    if how == "auto":
        how = "encoder" if enc.mean is not None else "manifest"
    if how == "encoder":
        if enc.mean is None:
            raise UserError("--normalize encoder: a bare model name records no normalisation; use manifest or imagenet")
        return list(enc.mean), list(enc.std), "encoder"
    if how == "imagenet":
        return list(IMAGENET_MEAN), list(IMAGENET_STD), "imagenet"
    mean, std = normalization({"normalize": "manifest"}, manifest)
    return list(mean), list(std), "manifest"


# --------------------------------------------------------------------------- the data side


class _ShardBatches(IterableDataset):
    """Batches of whole shards in stored order: worker w of W takes shards w, w + W, ... and
    yields (shard index, is its last batch, images, labels). Shards are paths or URLs; an
    undecodable image, or the rest of a shard that breaks off, is skipped with a warning."""

    def __init__(self, shards: Sequence[Path | str], transform: Callable, batch_size: int, labels: Callable | None = None):
        from sslctl.shardfmt import label_of

        self.shards, self.transform, self.batch_size = list(shards), transform, batch_size
        self.labels = labels or label_of

    def __iter__(self):
        from sslctl.data import iter_shard

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for index in range(worker, len(self.shards), workers):
            images, labels, sent, errors = [], [], False, []
            for _, image, label in iter_shard(self.shards[index], rgb=True, labels=self.labels, errors=errors):
                images.append(self.transform(image))
                labels.append(label)
                if len(images) == self.batch_size:
                    if sent is not False:
                        yield index, False, *sent
                    sent, images, labels = (torch.stack(images), torch.tensor(labels)), [], []
            if images:
                if sent is not False:
                    yield index, False, *sent
                sent = (torch.stack(images), torch.tensor(labels))
            if sent is False:  # an empty shard still reports that it is done
                sent = (torch.empty(0), torch.empty(0, dtype=torch.int64))
            for where, reason in errors:
                console.warn(f"{where}: {reason}; skipped")
            yield index, True, *sent


def embed_shards(
    model: nn.Module,
    shards: Sequence[Path],
    *,
    transform: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 256,
    device: torch.device = torch.device("cpu"),
    bf16: bool = False,
    channels_last: bool = True,
    workers: int = 0,
    on_batch: Callable[[int], None] | None = None,
    labels: Callable[[dict], int] | None = None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Embed each shard; yield (index into `shards`, features N x D float32 CPU, labels N) as
    each one finishes (in any order across shards; rows in stored order within one).

    `model` must already be on `device` and in eval mode. A distributed embed gives each rank its
    own list of shards. on_batch(n) is called after every batch of n images (progress).
    labels(sample) reads a sample's label (default: its .cls; a dataset's: shardfmt.Labels)."""
    workers = min(workers, len(shards))  # 0 when a resumed embed has every part already
    loader = DataLoader(
        _ShardBatches(shards, transform, batch_size, labels),
        batch_size=None,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers > 0 else None,
    )
    pending: dict[int, tuple[list, list]] = {}
    batches = ((images, index, last, labels) for index, last, images, labels in loader)
    for features, index, last, labels in predict(model, batches, device=device, bf16=bf16, channels_last=channels_last):
        feats, labs = pending.setdefault(index, ([], []))
        if len(features):
            feats.append(features)
            labs.append(labels)
            if on_batch:
                on_batch(len(features))
        if last:
            del pending[index]
            if not feats:
                raise UserError(f"{shards[index]}: the shard holds no images")
            yield index, torch.cat(feats), torch.cat(labs).to(torch.int64)


def embed_shard(model: nn.Module, tar_path: Path, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) of one shard, rows in stored order; kwargs as for `embed_shards`."""
    _, feats, labels = next(embed_shards(model, [tar_path], **kwargs))
    return feats, labels


# ---------------------------------------------------------------------------- the stage


def default_out(encoder: str | Path, layer: str, weights: str | None) -> Path:
    """RUN/features[-projector][-random].safetensors beside a run or encoder file; for a bare
    model name, features-NAME-random.safetensors in the current directory."""
    path = Path(encoder)
    suffix = ("-projector" if layer == "projector" else "") + ("-random" if weights == "random" else "")
    if path.is_dir():
        return path / f"features{suffix}.safetensors"
    if path.is_file():
        return path.parent / f"features{suffix}.safetensors"
    return Path(f"features-{encoder}-random.safetensors")


def embed(
    encoder: str | Path,
    shards: str | Path,
    *,
    splits: Sequence[str] | None = None,
    out: str | Path | None = None,
    layer: str = "backbone",
    weights: str | None = None,
    small_stem: bool | None = None,
    input_size: int | None = None,
    normalize: str = "auto",
    batch_size: int = 256,
    device: str = "auto",
    dtype: str = "float32",
    bf16: bool | None = None,
    channels_last: bool | None = None,
    workers: int | None = None,
    seed: int = 0,
    label_key: str | None = None,
) -> Path:
    """Embed `splits` (default: all) of the shards with the frozen encoder; write and return FEATS.

    shards: anything sslctl.datasets.open_dataset opens (sslctl shards, foreign shards, patterns,
    URLs, {split: spec}); foreign shards are indexed once into FEATS's directory."""
    from sslctl import distributed
    from sslctl.augment import eval_transform
    from sslctl.data import open_dataset, split_shards
    from sslctl.devices import CHANNELS_LAST, default_amp, resolve_device
    from sslctl.shardfmt import Labels, shard_id

    if dtype not in ("float32", "float16"):
        raise UserError(f"--dtype {dtype}: expected float32 or float16")
    out = Path(out) if out else default_out(encoder, layer, weights)
    manifest = open_dataset(shards, index_dir=out.parent, label_key=label_key)
    splits = list(splits or manifest["splits"])
    paths = {s: split_shards(manifest, s) for s in splits}  # UserError for an unknown split
    enc = open_encoder(encoder, layer=layer, weights=weights, small_stem=small_stem, input_size=input_size, seed=seed)
    mean, std, norm_source = resolve_normalization(normalize, enc, manifest)
    dev = resolve_device(device)
    distributed.init_from_env(dev.type)
    rank, world = distributed.rank(), distributed.world_size()
    bf16 = default_amp(dev) if bf16 is None else bf16
    channels_last = CHANNELS_LAST if channels_last is None else channels_last
    model = enc.model.to(dev).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if workers is None:
        from sslctl.data import default_workers

        workers = default_workers()
    parts = out.parent / f"{out.name}.parts"

    # Everything that changes a row of features; a saved part with another fingerprint is redone.
    weights_id = {role: sha256_file(f) for role, f in enc.files.items()} or enc.info
    recipe = {"weights": weights_id, "layer": layer, "input_size": enc.input_size, "mean": mean, "std": std, "bf16": bf16}
    fingerprint = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()

    transform = eval_transform(enc.input_size, mean, std)
    todo: list[tuple[str, int, Path, str]] = []  # (split, shard number, tar, part file)
    for split in splits:
        for i, (tar, entry) in enumerate(zip(paths[split], manifest["splits"][split]["shards"])):
            part = parts / f"{split}-{i:06d}.safetensors"
            shard_fp = f"{fingerprint}:{shard_id(entry)}"
            if not _part_matches(part, shard_fp):
                todo.append((split, i, tar, shard_fp))
    total = sum(manifest["splits"][s]["count"] for s in splits)
    remaining = sum(manifest["splits"][s]["shards"][i]["count"] for s, i, _, _ in todo)
    if remaining < total and rank == 0:
        console.log(f"embed: resuming, {total - remaining} of {total} images already embedded in {parts}")
    parts.mkdir(parents=True, exist_ok=True)
    distributed.barrier()  # every rank has listed the parts before any rank writes one
    mine = todo[rank::world]

    start = time.perf_counter()
    with console.progress() as bar:
        n_mine = sum(manifest["splits"][s]["shards"][i]["count"] for s, i, _, _ in mine)
        task = bar.add_task("embed", total=n_mine, visible=rank == 0)
        progress = {"done": 0, "logged": start}

        def advance(n: int) -> None:
            bar.advance(task, n)
            progress["done"] += n
            now = time.perf_counter()
            if bar.disable and rank == 0 and now - progress["logged"] > 30:  # batch logs: a line per 30 s
                progress["logged"] = now
                console.log(f"embed: {progress['done']:,}/{n_mine:,} images ({progress['done'] / (now - start):,.0f} images/s)")

        results = embed_shards(
            model, [t[2] for t in mine], transform=transform, batch_size=batch_size, device=dev, bf16=bf16,
            channels_last=channels_last, workers=workers, on_batch=advance, labels=Labels(manifest),
        )
        for index, feats, labels in results:
            split, i, tar, shard_fp = mine[index]
            expected = manifest["splits"][split]["shards"][i]["count"]
            if len(labels) != expected:  # unreadable samples were skipped: the features have no rows for them
                console.warn(f"{tar}: {expected - len(labels)} of its {expected} images could not be read; "
                             "the features leave them out")
            save_safetensors(parts / f"{split}-{i:06d}.safetensors", {"features": feats.contiguous(), "labels": labels},
                             {"fingerprint": shard_fp})
    distributed.barrier()  # every rank's parts are written
    if rank != 0:
        return out
    elapsed = time.perf_counter() - start
    if remaining:
        console.log(f"embed: {remaining} images in {elapsed:.1f} s ({remaining / max(elapsed, 1e-9):,.0f} images/s) on {dev}"
                    f"{f' x {world} processes' if world > 1 else ''}{' with bf16' if bf16 else ''}")

    tensors: dict[str, torch.Tensor] = {}
    for split in splits:
        loaded = [load_file(str(parts / f"{split}-{i:06d}.safetensors")) for i in range(len(paths[split]))]
        tensors[f"{split}.features"] = torch.cat([p["features"] for p in loaded]).to(getattr(torch, dtype)).contiguous()
        tensors[f"{split}.labels"] = torch.cat([p["labels"] for p in loaded]).contiguous()
    inputs = {**enc.files, "shards": manifest["path"]}
    meta = {
        "format": FORMAT,
        "version": str(VERSION),
        "splits": json.dumps(splits),
        "encoder": json.dumps(enc.info),
        "layer": layer,
        "shards": json.dumps({"manifest": manifest["path"], "sha256": sha256_file(manifest["path"])}),
        "classes": json.dumps(manifest.get("classes")),
        "input_size": str(enc.input_size),
        "normalization": json.dumps({"mean": mean, "std": std, "source": norm_source}),
        "bf16": str(bool(bf16)).lower(),
        "provenance": json.dumps(provenance(inputs)),
    }
    save_safetensors(out, tensors, meta)
    shutil.rmtree(parts, ignore_errors=True)
    return out


def _part_matches(part: Path, fingerprint: str) -> bool:
    if not part.is_file():
        return False
    try:
        with safe_open(str(part), framework="pt") as f:
            return (f.metadata() or {}).get("fingerprint") == fingerprint
    except (SafetensorError, OSError):
        return False  # a damaged part is redone


# ------------------------------------------------------------------------ reading features


def read_features_metadata(path: str | Path) -> dict:
    """The decoded metadata of a features file; UserError naming the file for anything else."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such features file (make one with `sslctl embed ENCODER SHARDS`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, keys = f.metadata() or {}, set(f.keys())
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path}: not a readable safetensors file ({err})") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{path}: not an sslctl features file (metadata format={meta.get('format')!r}, expected "
                        f"{FORMAT!r}); make one with `sslctl embed`")
    decoded = {k: meta[k] for k in ("format", "version", "layer")}
    for k in ("splits", "encoder", "shards", "classes", "normalization", "provenance"):
        decoded[k] = json.loads(meta.get(k, "null"))
    decoded["input_size"] = int(meta["input_size"])
    decoded["bf16"] = meta.get("bf16") == "true"
    decoded["tensors"] = sorted(keys)
    return decoded


def load_split_pair(path: str | Path, first: str, second: str) -> tuple[dict, tuple[torch.Tensor, torch.Tensor],
                                                                       tuple[torch.Tensor, torch.Tensor]]:
    """The metadata and two labelled splits of a features file (a kNN bank and its queries, a
    probe's train and eval splits); UserError when their dimensions differ."""
    meta = read_features_metadata(path)
    a, b = load_split(path, first), load_split(path, second)
    if a[0].shape[1] != b[0].shape[1]:
        raise UserError(f"{path}: {first}.features has {a[0].shape[1]} dimensions but {second}.features has "
                        f"{b[0].shape[1]}; embed both splits with the same encoder and layer")
    return meta, a, b


def load_split(path: str | Path, split: str, *, need_labels: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(features N x D float32, labels N int64) of one split; UserError naming the file when the
    split is missing or (need_labels) its labels are missing."""
    meta = read_features_metadata(path)
    if f"{split}.features" not in meta["tensors"]:
        have = ", ".join(meta["splits"] or []) or "none"
        raise UserError(f"{path}: no split {split!r} (it has: {have}); embed it with `sslctl embed ... --split {split}`")
    with safe_open(str(path), framework="pt") as f:
        features = f.get_tensor(f"{split}.features").float()
        labels = f.get_tensor(f"{split}.labels") if f"{split}.labels" in meta["tensors"] else None
    if features.ndim != 2:
        raise UserError(f"{path}: {split}.features has shape {tuple(features.shape)}, expected N x D")
    if labels is None or labels.shape != (features.shape[0],):
        raise UserError(f"{path}: {split}.labels is missing or does not have one label per row")
    if need_labels and (labels < 0).any():
        raise UserError(
            f"{path}: split {split!r} has no labels (the shards were made from unlabelled images); "
            "kNN and linear probes need labelled shards, e.g. class folders"
        )
    return features, labels.to(torch.int64)
