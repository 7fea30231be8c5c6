"""The data of one training run (train.Engine): the one place a run opens its dataset.

    RunData(shards, cfg, options, ...)   the manifest, the global and per-rank batch, the
                                         normalisation, the training loader in the chosen view mode
    .skipped()                           what the ranks' loaders could not read so far (metrics)
    .batches(epoch, start)               that epoch's view batches on the device
    .loader(split, transform, ...)       any split: this rank's training batches, or all in order
    .features(method, split)             the method's embedding of a whole split (the monitor)
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch

from sslctl import checkpoint as ckpt
from sslctl import console
from sslctl import distributed as dist
from sslctl.augment import build_views, eval_transform, normalization, view_configs
from sslctl.augment_batch import BatchViews
from sslctl.data import ShardLoader, default_workers, make_loader, open_dataset
from sslctl.errors import UserError
from sslctl.methods import Method
from sslctl.predict import predict_split
from sslctl.run_options import RunOptions


class RunData:
    def __init__(self, shards: str | Path, cfg: dict, options: RunOptions, *, rank: int, world: int,
                 device: torch.device, channels_last: bool, index_dir: str | Path | None = None,
                 wrap_loader: Callable[["RunData", ShardLoader], ShardLoader] | None = None):
        self.shards, self.cfg, self.options = shards, cfg, options
        self.rank, self.world, self.device, self.channels_last = rank, world, device, channels_last
        # sslctl shards, or any WebDataset (datasets.open_dataset), indexed once into index_dir (the run)
        self.manifest = open_dataset(shards, index_dir=index_dir)
        self.batch = int(cfg["optim"]["batch_size"])  # global; each rank loads its share
        if self.batch % world:
            raise UserError(f"optim.batch_size = {self.batch} is not divisible by the {world} processes; pick a multiple")
        self.batch_per_rank = self.batch // world
        self.mean, self.std = normalization(cfg["augment"], self.manifest)
        self.workers = default_workers(world) if options.workers is None else options.workers
        self.seed = options.seed
        self.views_per_image = len(view_configs(cfg["augment"]))
        self.train = self._train_loader()
        if wrap_loader is not None:  # a stage's extra entries in the views (finetune's labels)
            self.train = wrap_loader(self, self.train)
        self.steps_per_epoch = len(self.train)  # equal on every rank (make_loader drops the rest)

    def loader(self, split: str, transform, *, shuffle: bool, rgb: bool = True, batch_transform=None) -> ShardLoader:
        """Training batches (shuffle: shuffled, whole batches, this rank's share), or a whole split in order."""
        return make_loader(
            self.manifest, split, batch_size=self.batch_per_rank, transform=transform, workers=self.workers,
            seed=self.seed, shuffle=shuffle, drop_last=shuffle, rgb=rgb,
            rank=self.rank if shuffle else 0, world_size=self.world if shuffle else 1,
            pin_memory=self.device.type == "cuda", batch_transform=batch_transform,
        )

    def _train_loader(self) -> ShardLoader:
        """The views as `options.views` says (run_options.VIEW_MODES)."""
        aug, views = self.cfg["augment"], self.options.views
        per_image = build_views(aug, self.mean, self.std) if views != "batch" else None
        if views == "per-image":
            return self.loader("train", per_image, shuffle=True)
        if aug.get("interpolation", "bilinear") != "bilinear":
            console.log(f"augment.interpolation = {aug['interpolation']}: batched views resize with area-averaged "
                        "bilinear sampling (--views per-image follows the recipe's interpolation)"
                        + ("; with --views auto, only batches of small images of one shape are batched" if views == "auto" else ""))
        # the loader decodes; gray images stay 1 channel until BatchViews normalises them
        return self.loader("train", per_image, shuffle=True, rgb=False, batch_transform=BatchViews(aug, self.mean, self.std))

    def features(self, method: Method, split: str, *, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(method.embed of every image, labels) of a whole split in stored order, with the
        evaluation transform at the recipe's crop size."""
        batches = self.loader(split, eval_transform(int(self.cfg["augment"]["crop_size"]), self.mean, self.std), shuffle=False)
        return predict_split(method, method.embed, batches, device=self.device, bf16=bf16, channels_last=self.channels_last)

    def skipped(self) -> dict[str, int]:
        """{"skipped_shards", "skipped_samples"} summed over the ranks, when any (broken shards,
        replaced samples); a collective: every rank calls it at the same step."""
        counts = self.train.skipped() if hasattr(self.train, "skipped") else {"shards": 0, "samples": 0}
        total = dist.all_reduce_sum(torch.tensor([counts["shards"], counts["samples"]], device=self.device))
        return dict(zip(("skipped_shards", "skipped_samples"), total.tolist())) if total.any() else {}

    def check_labelled_split(self, split: str, flag: str) -> None:
        splits = self.manifest.get("splits", {})
        if split not in splits:
            raise UserError(f"{flag} {split}: {self.manifest['path']} has splits {', '.join(splits) or '(none)'}")
        if not self.manifest.get("labelled"):
            raise UserError(f"{flag} needs labelled shards; {self.manifest['path']} lists no classes")

    def batches(self, epoch: int, start: int) -> Iterator[list[torch.Tensor]]:
        """This epoch's view batches on the device, from batch `start` on (the loader skips the
        earlier ones without decoding them).

        The main process's RNGs are put back after every fetch, so the loader (which draws worker
        base seeds when its iterator starts, and augments in this process with workers=0) never
        shifts the training's random stream: a resumed run draws exactly what the original did."""
        self.train.set_epoch(epoch, start)
        it = iter(self.train)
        for _ in range(start, self.steps_per_epoch):
            saved = ckpt.rng_state()
            batch = next(it, None)
            ckpt.set_rng_state(saved)
            if batch is None:
                return
            views, _labels = batch
            yield [v.to(self.device, non_blocking=True, memory_format=self._memory_format(v)) for v in views]

    def _memory_format(self, v: torch.Tensor) -> torch.memory_format:
        return torch.channels_last if self.channels_last and v.ndim == 4 else torch.preserve_format
