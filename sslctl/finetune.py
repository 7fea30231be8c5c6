"""`sslctl finetune`: SimCLR v2's semi-supervised fine-tuning (docs/spec/methods.md §2e) of any pretrain run.

    RUN (pretrained) + SHARDS (labelled) --labels 1% -> RUN_DIR
        labelled_keys.txt       the stratified labelled subset: one "KEY<TAB>CLASS" line per sample
        labelled/               that subset as shards (manifest.json + one tar), the training data
        recipe.toml, checkpoints/last.pt, encoder.safetensors, metrics.jsonl   as `sslctl pretrain`

The model is the run's encoder, the first `head_layers` layers of its projection head (a layer
starts at each Linear: SimCLR v2 fine-tunes from the first, `ft_proj_selector=1`) and a new,
zero-initialised linear classifier; all of it is trained with cross-entropy. Defaults are the
README's 1%-label command: LARS, lr 0.005 x sqrt(batch), wd 0, no warmup, cosine per step,
60 epochs, global BN, crop + flip only.

The training loop is train.py's Engine (checkpoints, exact resume, metrics, signals, DDP, bf16)
driving the `FineTune` Method, which declares its initial weights and its optimiser groups; the
Engine's loader wrapper `append_labels` hands it the labels. `sslctl distill` runs the same way.
"""

from __future__ import annotations

import math
import os
import random
import re
import tarfile
import tempfile
import tomllib
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from sslctl import checkpoint as ckpt
from sslctl import console
from sslctl import distributed as dist
from sslctl.artifacts import atomic_write_text, provenance
from sslctl.augment import eval_transform
from sslctl.data import load_manifest, make_loader, split_shards
from sslctl.shardfmt import MANIFEST, ShardWriter, image_ext, read_samples, shard_name, write_manifest
from sslctl.encoder_io import read_metadata
from sslctl.devices import resolve_device
from sslctl.encoders import build_encoder
from sslctl.errors import UserError
from sslctl.heads import from_config
from sslctl.methods.base import Method
from sslctl.optim import ParamGroup
from sslctl.predict import predict_split
from sslctl.recipes import load_recipe, recipe_to_toml
from sslctl.run_options import RunOptions
from sslctl.siamese import use_sync_bn
from sslctl.train import Engine

KEYS_FILE, SUBSET_DIR = "labelled_keys.txt", "labelled"

# README 1%-label fine-tuning command (docs/spec/methods.md §2e); every key can be changed with --set.
OPTIM = {"name": "lars", "batch_size": 1024, "lr": 0.005, "base_batch": 1024, "scaling": "sqrt", "momentum": 0.9,
         "weight_decay": 0.0, "exclude_bn_bias": True, "trust_coefficient": 0.001}
SCHEDULE = {"epochs": 60, "warmup_epochs": 0, "lr_schedule": "cosine", "per": "step", "final_lr": 0.0, "milestones": []}
# Fine-tuning sees crop + flip only (simclr preprocess_for_train with color_distort=False).
AUGMENT_KEPT = ("crop_size", "interpolation", "normalize")
AUGMENT = {"views": 1, "crop_scale": [0.08, 1.0], "flip_p": 0.5, "jitter": [0.0, 0.0, 0.0, 0.0], "jitter_p": 0.0,
           "grayscale_p": 0.0, "blur_p": 0.0, "blur_sigma": [0.1, 2.0], "solarize_p": 0.0}


# ------------------------------------------------------------------------------ the labelled subset


def parse_labels(text: str) -> tuple[str, float]:
    """'1%' -> ("percent", 1.0); '600' -> ("count", 600): a total over all classes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(%?)\s*", str(text))
    if not m or float(m.group(1)) <= 0 or (m.group(2) and float(m.group(1)) > 100) or (not m.group(2) and "." in m.group(1)):
        raise UserError(f"--labels {text}: expected a percentage of the labelled images (1%, 10%) or a whole number of images (600)")
    return ("percent", float(m.group(1))) if m.group(2) else ("count", int(m.group(1)))


def stratified_subset(keys: list[str], labels: list[int], how: tuple[str, float], seed: int) -> list[tuple[str, int]]:
    """A class-stratified random subset: each class gets its share of the total (largest remainders
    round it to the exact total, and every class keeps at least one image when the total allows).
    Deterministic in (keys, labels, how, seed). Returns (key, label) sorted by class, then key."""
    by_class: dict[int, list[str]] = defaultdict(list)
    for key, label in zip(keys, labels):
        by_class[label].append(key)
    n = len(keys)
    kind, value = how
    total = round(n * value / 100) if kind == "percent" else int(value)
    if not 1 <= total <= n:
        raise UserError(f"--labels asks for {total} images but the split has {n} labelled images")
    classes = sorted(by_class)
    quota = {c: total * len(by_class[c]) / n for c in classes}
    take = {c: max(1 if total >= len(classes) else 0, math.floor(quota[c])) for c in classes}
    order = sorted(classes, key=lambda c: (-(quota[c] - math.floor(quota[c])), c))
    i = 0
    while sum(take.values()) < total:  # hand out the remainder by the largest fractional parts
        c = order[i % len(order)]
        if take[c] < len(by_class[c]):
            take[c] += 1
        i += 1
    while sum(take.values()) > total:  # the one-per-class floor overshot: trim the largest classes
        c = max(classes, key=lambda c: (take[c], -c))
        take[c] -= 1
    rng = random.Random(seed)
    chosen = []
    for c in classes:
        chosen += [(k, c) for k in sorted(rng.sample(sorted(by_class[c]), take[c]))]
    return chosen


def _sample_key(member_name: str) -> tuple[str, str]:
    """(key, extension) of a tar member, as webdataset (and sslctl.data) split it."""
    key, _, ext = member_name.partition(".")
    return key, ext


def read_labels(manifest: dict, split: str) -> tuple[list[str], list[int]]:
    """Keys and class indices of a split, from the `.cls` members only (image data is skipped)."""
    keys, labels = [], []
    for path in split_shards(manifest, split):
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                key, ext = _sample_key(member.name)
                if member.isfile() and ext == "cls":
                    keys.append(key)
                    labels.append(int(tar.extractfile(member).read()))
                tar.members = []
    return keys, labels


def write_subset_shards(manifest: dict, chosen: list[tuple[str, int]], out: Path, mean, std, source: dict) -> Path:
    """The chosen samples of split `source["split"]` (original image bytes) as a one-split shards
    directory `out` whose manifest carries the encoder's mean/std, so `normalize = "manifest"`
    normalises as in pretraining, and how the subset was chosen (`source`)."""
    split = source["split"]
    wanted = dict(chosen)
    writer = ShardWriter(out / shard_name("train", 0))
    for path in split_shards(manifest, split):
        for sample in read_samples(path):
            key, ext = sample["__key__"], image_ext(sample)
            if key in wanted and ext is not None:
                writer.add(key, ext, sample[ext], wanted[key])
    shard = writer.close()
    if shard["count"] != len(chosen):
        raise UserError(f"{manifest['path']}: found {shard['count']} of the {len(chosen)} chosen images in split {split!r}")
    write_manifest(out, {
        "source": source,
        "labelled": True, "classes": manifest.get("classes"), "channels": manifest.get("channels"),
        "image_size": manifest.get("image_size"), "mean": list(mean), "std": list(std), "stats_split": "train",
        "splits": {"train": {"count": shard["count"], "shards": [shard], "skipped": 0}}, "skipped": [],
        "provenance": provenance({"shards": manifest["path"]}),
    })
    return out


def labelled_subset(manifest: dict, split: str, labels: str, seed: int, out: Path, mean, std) -> Path:
    """Choose the subset and write it into the run dir `out` (kept as it is when already there)."""
    keys_file, subset = out / KEYS_FILE, out / SUBSET_DIR
    chosen_by = {"kind": "labelled subset", "path": manifest["path"], "split": split, "labels": str(labels), "subset_seed": seed}
    if keys_file.is_file() and (subset / MANIFEST).is_file():
        kept = load_manifest(subset)["source"]
        if kept != chosen_by:
            raise UserError(
                f"{out} already holds a labelled subset chosen with {kept}; this command asks for {chosen_by}. "
                "Rerun with the same shards, --split, --labels and --subset-seed, or use a new --out"
            )
        return subset
    keys, classes = read_labels(manifest, split)
    if not keys:
        raise UserError(f"{manifest['path']}: split {split!r} has no labelled images (shard a labelled source)")
    chosen = stratified_subset(keys, classes, parse_labels(labels), seed)
    write_subset_shards(manifest, chosen, subset, mean, std, chosen_by)
    atomic_write_text(keys_file, "".join(f"{k}\t{c}\n" for k, c in chosen))  # last: marks the subset complete
    per_class = defaultdict(int)
    for _, c in chosen:
        per_class[c] += 1
    console.log(f"labelled subset: {len(chosen)} of {len(keys)} images ({labels}), per class {dict(sorted(per_class.items()))}; keys in {keys_file}")
    return subset


# ------------------------------------------------------------------------------ the model


def head_prefix(projector: nn.Sequential, layers: int) -> nn.Sequential:
    """The first `layers` layers of an MLP head, a layer starting at each Linear (Linear-BN-ReLU
    in SimCLR's head). Module indices are kept, so the state_dict keys match the full head's."""
    starts = [i for i, m in enumerate(projector) if isinstance(m, nn.Linear)]
    if not 0 <= layers <= len(starts):
        raise UserError(f"--head-layers {layers}: the run's projection head has {len(starts)} layers (0 = encoder only)")
    end = starts[layers] if layers < len(starts) else len(projector)
    return nn.Sequential(*list(projector)[:end])


def out_features(backbone: nn.Module, head: nn.Sequential) -> int:
    linears = [m for m in head if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else backbone.feature_dim


class FineTune(Method):
    """Encoder + the first `method.head_layers` layers of the pretrained head + a zero-initialised
    linear classifier, trained with cross-entropy. Views: [images, labels] (`append_labels`)."""

    n_views = 1
    defaults = {"method": {"sync_bn": False}}

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        method = cfg["method"]
        self.backbone = build_encoder(cfg["encoder"])
        layers = int(method["head_layers"])
        self.projector = head_prefix(from_config(self.backbone.feature_dim, cfg["head"]), layers) if layers else nn.Sequential()
        self.classifier = nn.Linear(out_features(self.backbone, self.projector), int(method["num_classes"]))
        nn.init.zeros_(self.classifier.weight)  # SimCLR v2: zero-initialised logits layer
        nn.init.zeros_(self.classifier.bias)
        sync = bool(method["sync_bn"])
        self.backbone, self.projector = use_sync_bn(self.backbone, sync), use_sync_bn(self.projector, sync)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.projector(self.backbone(x)))

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        x, y = views
        logits = self.logits(x).float()
        return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(1) == y).float().mean().detach()}

    def param_groups(self) -> list[ParamGroup]:
        """The zero-initialised classifier (SimCLR's head_supervised) gets neither weight decay nor
        LARS's trust ratio, which (eta |w| / |g|) would hold it near 0."""
        return self.param_groups_apart(lambda name: name.startswith("classifier."), weight_decay=0.0, adapt=False)

    def load_initial_weights(self) -> None:
        """The pretrained encoder and head layers from the source run's checkpoint."""
        source = Path(self.cfg["method"]["source"])
        state = ckpt.load(ckpt.checkpoint_path(source))["model"]
        mine = {k for k in self.state_dict() if k.startswith(("backbone.", "projector."))}
        missing = sorted(mine - set(state))
        if missing:
            raise UserError(
                f"{source}: its checkpoint lacks {missing[0]} (and {len(missing) - 1} more); "
                "use --head-layers 0 when the run's method has no MLP projector"
            )
        self.load_state_dict({k: state[k] for k in mine}, strict=False)


# ------------------------------------------------------------------------------ the loop


class _AppendLabels:
    """The Engine's loader, with each batch's labels appended to its views (Methods see only views)."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.loader.set_epoch(epoch, start_batch)

    def __iter__(self):
        for views, labels in self.loader:
            yield [*views, labels], labels


def append_labels(data, loader) -> _AppendLabels:
    """The Engine's `wrap_loader` for a Method that learns from the shards' labels."""
    return _AppendLabels(loader)


def predict_logits(model: nn.Module, shards, split: str, size: int, mean, std, device, *, bf16: bool = False,
                   channels_last: bool = False, workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits N x C, labels N) of `model.logits` over a split in stored order (evaluation transform)."""
    loader = make_loader(shards, split, batch_size=256, transform=eval_transform(size, mean, std), workers=workers,
                         shuffle=False, drop_last=False, rank=0, world_size=1)
    return predict_split(model, model.logits, loader, device=torch.device(device), bf16=bf16, channels_last=channels_last)


def log_top1(engine: Engine, manifest: dict, split: str | None) -> None:
    """The trained classifier's top-1 on `split` of the labelled shards, when they have it, into
    the run's metrics.jsonl (rank 0)."""
    if not engine.main or split not in manifest["splits"]:
        return
    logits, labels = predict_logits(engine.method, manifest, split, int(engine.cfg["augment"]["crop_size"]),
                                    engine.data.mean, engine.data.std, engine.device, bf16=engine.amp,
                                    channels_last=engine.channels_last, workers=engine.data.workers)
    top1 = 100.0 * (logits.argmax(1) == labels).float().mean().item()
    engine.log.write({"step": engine.step, "eval_split": split, "top1": top1})
    console.log(f"top-1 of the classifier on {split}: {top1:.2f}%")


def stage_options(options: dict, out: Path) -> RunOptions:
    """A stage's RunOptions: its errors name the run's own recipe.toml."""
    return replace(RunOptions(**options), recipe_file=str(out / "recipe.toml"))


def resolve_stage_recipe(cfg: dict, overrides: Iterable[str], name: str) -> dict:
    """`--set section.key=value` on a stage's generated recipe, with the recipe loader's checks."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.toml"
        path.write_text(recipe_to_toml(cfg))
        return load_recipe(path, variant="none", overrides=list(overrides))


def read_run(run: Path, what: str) -> tuple[dict, dict]:
    """(resolved recipe, encoder metadata) of a run directory; UserError naming what is missing."""
    for needed in (run / "recipe.toml", ckpt.checkpoint_path(run), run / "encoder.safetensors"):
        if not needed.is_file():
            raise UserError(f"{run}: not a finished run directory ({needed.name} is missing); {what}")
    return tomllib.loads((run / "recipe.toml").read_text()), read_metadata(run / "encoder.safetensors")


def _fit_batch(cfg: dict, n: int) -> None:
    """A batch larger than the labelled subset becomes the subset (whole batches per process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if int(cfg["optim"]["batch_size"]) > n:
        cfg["optim"]["batch_size"] = max(world, n // world * world)
        console.log(f"optim.batch_size lowered to {cfg['optim']['batch_size']}: the labelled subset has {n} images")


def finetune(
    run: str | Path,
    shards: str | Path,
    out: str | Path,
    *,
    labels: str = "1%",
    head_layers: int = 1,
    subset_seed: int = 0,
    split: str = "train",
    eval_split: str | None = "test",
    overrides: Iterable[str] = (),
    **options,
) -> Path:
    """Fine-tune the pretrain run RUN on a stratified `labels` subset of the shards' `split`;
    write and return the run dir `out`. `eval_split` (when the shards have it) gets the final
    classifier's top-1 in metrics.jsonl. `options`: RunOptions' fields (device, resume, seed,
    workers, max_steps, ...). Raises UserError for bad inputs."""
    run, out = Path(run), Path(out)
    opts = stage_options(options, out)
    source_cfg, meta = read_run(run, "fine-tuning starts from a finished `sslctl pretrain` run")
    manifest = load_manifest(shards)
    if not manifest.get("labelled"):
        raise UserError(f"{manifest['path']}: the shards are unlabelled; fine-tuning needs labels (shard a labelled source)")
    dist.init_from_env(resolve_device(opts.device).type)
    if dist.is_main():  # rank 0 writes the subset; the others read it
        labelled_subset(manifest, split, labels, subset_seed, out, meta["mean"], meta["std"])
    dist.barrier()
    subset = out / SUBSET_DIR
    n = load_manifest(subset)["splits"]["train"]["count"]

    augment = {**{k: source_cfg["augment"][k] for k in AUGMENT_KEPT if k in source_cfg["augment"]}, **AUGMENT,
               "normalize": "manifest"}  # the subset's manifest holds the pretraining mean/std
    cfg = {
        "recipe": {"name": f"{source_cfg['recipe']['name']}_finetune", "method": "sslctl.finetune:FineTune",
                   "description": f"fine-tuned {run} on {labels} of the labels"},
        "augment": augment,
        "encoder": dict(source_cfg["encoder"]),
        "head": dict(source_cfg["head"]),
        "method": {"source": str(run.resolve()), "head_layers": head_layers, "num_classes": len(manifest["classes"]),
                   "labels": str(labels), "subset_seed": subset_seed, "sync_bn": True},
        "loss": {"name": "cross_entropy"},
        "optim": dict(OPTIM),
        "schedule": dict(SCHEDULE),
    }
    cfg = resolve_stage_recipe(cfg, overrides, "finetune")
    _fit_batch(cfg, n)
    engine = Engine(subset, cfg, out, opts, wrap_loader=append_labels)
    engine.run()
    log_top1(engine, manifest, eval_split)
    return out
