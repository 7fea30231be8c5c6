"""The training loop of `sslctl pretrain`: it knows nothing of any one method (DESIGN.md §3).

One step, for any Method (contract in sslctl/methods/base.py):

    lr = lr_at(step)                       written into every param group
    method.before_forward(progress)
    out = method.training_step(views)      under bf16 autocast where it helps
    out["loss"].backward()
    method.before_optimizer_step(progress)
    optimizer.step()
    method.after_optimizer_step(progress)

Around it: the global batch split over ranks (DDP wraps the Method itself, see `_StepModule`),
checkpoints that resume exactly (sslctl/checkpoint.py), metrics.jsonl, progress on stderr,
SIGTERM/SIGINT -> checkpoint -> exit 143/130, a stop on a NaN/inf loss, an optional online kNN
monitor, and the encoder export. Rank 0 alone writes files and logs.

Exact resume: data order and augmentation are functions of (seed, epoch, position) (sslctl/data.py),
every RNG of the main process is checkpointed, and a resumed epoch skips the batches already
consumed, so on the CPU a resumed run's losses equal an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from sslctl import checkpoint as ckpt
from sslctl import console
from sslctl import distributed as dist
from sslctl.artifacts import atomic_write_text
from sslctl.augment import build_views, eval_transform, normalization
from sslctl.augment_batch import BatchViews
from sslctl.data import default_workers, make_loader, open_dataset, seeded_call
from sslctl.encoder_io import save_encoder
from sslctl.errors import RunError, SslctlError, UserError
from sslctl.methods import Method, Progress, build_method
from sslctl.optim import build_optimizer, lr_at
from sslctl.recipes import recipe_to_toml, scaled_lr

CHECKPOINT_EVERY = 500  # steps; also at every epoch end
LOG_EVERY = 20  # steps; also at every epoch end


class Interrupted(SslctlError):
    """SIGTERM / SIGINT: the checkpoint is saved; exit 128 + signal number so a batch system requeues."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


# ------------------------------------------------------------------------------------ devices


def resolve_device(device: str) -> torch.device:
    """auto -> cuda when available; under torchrun each process takes its LOCAL_RANK's GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"--device {device}: expected auto, cpu or cuda")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda but torch sees no CUDA device; use --device cpu or auto")
        if device == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return torch.device(device)


def default_amp(device: torch.device) -> bool:
    """bf16 autocast on CUDA; on the CPU only where it has native bf16 (AVX512-BF16 / AMX),
    where it measured 2.5x faster for a ResNet-18 step at 32 px (docs/train.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


VIEW_MODES = ("auto", "per-image", "batch", "batch-on-device")


def check_views_mode(views: str) -> str:
    """How the training views are made (docs/performance.md):
    auto             (the default) in the loader's workers: a batch of one image shape, at most
                     128 x 128 px, as `batch`; any other batch as `per-image`
    per-image        torchvision v2, image by image, in the loader's workers;
    batch            sslctl/augment_batch.py's BatchViews on each whole uint8 batch, in the workers
                     (B1, 32 px: 1.05-1.19x per-image's images/s on the 2-core CPU, 1.15-1.54x on an
                     H200, where per-image views starve the GPU);
    batch-on-device  BatchViews on the training device, in the training process (H200, B1: slower
                     than both for MoCo v2 and BYOL: 2,476 and 3,020 images/s)."""
    if views not in VIEW_MODES:
        raise UserError(f"--views {views}: expected one of {', '.join(VIEW_MODES)}")
    return views


def default_channels_last(device: torch.device) -> bool:
    """channels_last measured faster for ResNets on the CPU (oneDNN) and is the fast layout
    for bf16 convolutions on CUDA tensor cores (docs/train.md)."""
    return True


# ------------------------------------------------------------------------------------ helpers


class _StepModule(nn.Module):
    """What DDP wraps: the Method, with forward = training_step. Methods call their submodules
    directly, so wrapping the backbone alone would miss the heads; wrapping the whole Method and
    dispatching through forward lets DDP see one forward per step and all-reduce every
    trainable parameter's gradient."""

    def __init__(self, method: Method):
        super().__init__()
        self.method = method

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.method.training_step(views)


class _StopSignals:
    """SIGTERM / SIGUSR1 (a batch system's warning) / SIGINT set a flag; the loop finishes the
    step, saves and exits. A second SIGINT (Ctrl-C) aborts at once (the last checkpoint stays);
    a repeated SIGTERM/SIGUSR1 is ignored, since a cluster may deliver the same warning twice
    (to the job and through torchrun)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopSignals":
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a worker thread): no handler
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _Window:
    """Sums over the steps since the last metrics line. Losses are summed as Python floats so a
    window restored from a checkpoint continues with exactly the same arithmetic."""

    def __init__(self, state: dict | None = None):
        state = state or {}
        self.n = int(state.get("n", 0))
        self.sums: dict[str, float] = dict(state.get("sums", {}))
        self.wait = self.busy = 0.0  # seconds blocked on the loader / whole steps (not checkpointed)
        self.steps_timed = 0

    def add(self, scalars: dict[str, float], wait: float, busy: float) -> None:
        self.n += 1
        for key, value in scalars.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.wait, self.busy, self.steps_timed = self.wait + wait, self.busy + busy, self.steps_timed + 1

    def state(self) -> dict:
        return {"n": self.n, "sums": dict(self.sums)}


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


# ------------------------------------------------------------------------------------ engine


class Engine:
    """One pretraining run. `pretrain(...)` builds it and calls `run()`."""

    def __init__(
        self,
        shards: str | Path,
        cfg: dict,
        out_dir: str | Path,
        *,
        device: str,
        resume: str,
        seed: int,
        workers: int | None,
        compile: bool | str,
        checkpoint_every: int,
        log_every: int,
        monitor_split: str | None,
        monitor_every: int,
        max_steps: int | None,
        channels_last: bool | None,
        amp: bool | None,
        recipe_file: str | None,
        views: str = "auto",
    ):
        if resume not in ("auto", "never"):
            raise UserError(f"--resume {resume}: expected auto or never")
        for name, value in (("--checkpoint-every", checkpoint_every), ("--log-every", log_every), ("--monitor-every", monitor_every)):
            if value < 1:
                raise UserError(f"{name} {value}: expected a positive number of steps/epochs")
        if max_steps is not None and max_steps < 1:
            raise UserError(f"--max-steps {max_steps}: expected a positive number")
        self.device = resolve_device(device)
        if self.device.type == "cuda":  # autotuned convolutions, TF32 for what runs outside autocast
            torch.backends.cudnn.benchmark = True
            torch.set_float32_matmul_precision("high")
        dist.init_from_env(self.device.type)
        self.rank, self.world = dist.rank(), dist.world_size()
        self.main = self.rank == 0
        if not self.main:
            console.set_quiet(True)  # rank 0 alone logs (methods log too, e.g. AdCo's ad_init); warnings still show
        self.cfg, self.shards, self.out = cfg, shards, Path(out_dir)
        self.seed, self.compile = seed, compile
        self.checkpoint_every, self.log_every = checkpoint_every, log_every
        self.monitor_split, self.monitor_every, self.max_steps = monitor_split, monitor_every, max_steps
        self.amp = default_amp(self.device) if amp is None else amp
        self.channels_last = default_channels_last(self.device) if channels_last is None else channels_last
        self.recipe_text = recipe_to_toml(cfg)
        self.recipe_file = recipe_file or cfg["recipe"]["name"]
        self.ckpt_path = ckpt.checkpoint_path(self.out)
        self.metrics_path = self.out / "metrics.jsonl"

        # Resume decision first: a mismatch must fail before minutes of setup.
        state: dict | None = None
        self._saved_step: int | None = None  # the step of the checkpoint on disk
        if self.ckpt_path.exists():
            if resume == "never":
                raise UserError(
                    f"{self.out} already holds a run ({self.ckpt_path}); pass --resume auto to continue it "
                    "or choose a new --out"
                )
            state = ckpt.load(self.ckpt_path)
            ckpt.check_same_recipe(state["recipe"], self.recipe_text, self.out / "recipe.toml", self.recipe_file)

        # Data: the recipe's batch is global; each rank loads its share.
        self.manifest = open_dataset(self.shards, index_dir=self.out)  # sslctl shards, or any WebDataset (indexed once)
        if monitor_split:
            self._check_monitor_split()
        batch = int(cfg["optim"]["batch_size"])
        if batch % self.world:
            raise UserError(f"optim.batch_size = {batch} is not divisible by the {self.world} processes; pick a multiple")
        self.batch, self.batch_per_rank = batch, batch // self.world
        self.mean, self.std = normalization(cfg["augment"], self.manifest)
        self.workers = default_workers(self.world) if workers is None else workers
        self.views = check_views_mode(views)
        self.batch_views = None  # set when the views are made on the device
        per_image = build_views(cfg["augment"], self.mean, self.std) if self.views in ("auto", "per-image") else None
        if self.views == "per-image":
            self.loader = self._loader("train", per_image, shuffle=True)
        else:  # the loader decodes; gray images stay 1 channel until BatchViews normalises them
            batch_views = BatchViews(cfg["augment"], self.mean, self.std)
            if self.views == "batch-on-device":
                self.batch_views = batch_views
                self.loader = self._loader("train", None, shuffle=True, rgb=False)
            else:
                self.loader = self._loader("train", per_image, shuffle=True, rgb=False, batch_transform=batch_views)
        self.steps_per_epoch = len(self.loader)  # equal on every rank (make_loader drops the rest)
        self.epochs = int(cfg["schedule"]["epochs"])
        self.total_steps = self.epochs * self.steps_per_epoch
        self.last_step = self.total_steps if max_steps is None else min(self.total_steps, max_steps)

        # Model: identical initialisation on every rank (seed), then per-rank RNG streams.
        _seed_all(seed)
        self.method = build_method(cfg)
        self.method.to(self.device)
        if self.channels_last:
            self.method.to(memory_format=torch.channels_last)
        self.peak_lr, lr_message = scaled_lr(cfg)
        self.optimizer = build_optimizer(self.method, cfg["optim"], self.peak_lr)
        _seed_all(seed * 1000 + self.rank + 1)
        self.step = self.epoch = self.position = 0
        self.window = _Window()
        self.setup_done = False
        if state is not None:
            self._restore(state)
            del state  # the model and optimizer hold their own copies now
        self.step_fn = self._wrap()

        if self.main:
            console.log(
                f"pretrain {cfg['recipe']['name']} (variant {cfg['recipe'].get('variant', 'none')}) on {self.device}"
                f"{f' x {self.world} processes' if self.world > 1 else ''}: batch {batch} global"
                f"{f' = {self.batch_per_rank} per process' if self.world > 1 else ''}, {lr_message}, "
                f"{self.steps_per_epoch} steps/epoch x {self.epochs} epochs, bf16 {'on' if self.amp else 'off'}, "
                f"channels_last {'on' if self.channels_last else 'off'}, {self.workers} loader workers, "
                f"views {self.views}"
            )
            if self.views != "per-image" and cfg["augment"].get("interpolation", "bilinear") != "bilinear":
                console.log(f"augment.interpolation = {cfg['augment']['interpolation']}: batched views resize with "
                            "area-averaged bilinear sampling (--views per-image follows the recipe's interpolation)"
                            + ("; with --views auto, only batches of small images of one shape are batched" if self.views == "auto" else ""))
            if self._saved_step is not None:
                console.log(f"resuming {self.ckpt_path} at step {self.step} (epoch {self.epoch + 1}, batch {self.position})")

    # -------------------------------------------------------------------------- construction

    def _loader(self, split: str, transform, *, shuffle: bool, rank: int | None = None, world_size: int | None = None,
                rgb: bool = True, batch_transform=None):
        """Training batches (shuffled, whole batches, this rank's share), or a whole split in order."""
        return make_loader(
            self.manifest, split, batch_size=self.batch_per_rank, transform=transform, workers=self.workers,
            seed=self.seed, shuffle=shuffle, drop_last=shuffle, rgb=rgb,
            rank=self.rank if rank is None else rank, world_size=self.world if world_size is None else world_size,
            pin_memory=self.device.type == "cuda", batch_transform=batch_transform,
        )

    def _check_monitor_split(self) -> None:
        splits = self.manifest.get("splits", {})
        if self.monitor_split not in splits:
            raise UserError(
                f"--monitor {self.monitor_split}: {self.manifest['path']} has splits {', '.join(splits) or '(none)'}"
            )
        if not self.manifest.get("labelled"):
            raise UserError(f"--monitor needs labelled shards; {self.manifest['path']} lists no classes")

    def _wrap(self):
        """The callable that runs training_step: DDP over the whole Method when distributed."""
        if self.compile:
            # In place (nn.Module.compile), so state_dict keys and the encoder export are unchanged.
            backend = self.compile if isinstance(self.compile, str) else "inductor"
            for child in self.method.children():
                child.compile(backend=backend)
        if self.world == 1:
            return self.method.training_step
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Buffers (queues, banks, BN statistics) are synced once at construction and then kept
        # identical by the methods themselves; DDP's per-step buffer broadcast would copy a
        # 65536-column queue every step.
        return DDP(
            _StepModule(self.method),
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            forward_sync_buffers=False,
        )

    def _restore(self, state: dict) -> None:
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.epoch, self.position = int(state["step"]), int(state["epoch"]), int(state["position"])
        self._saved_step = self.step
        self.window = _Window(state.get("window"))
        self.setup_done = bool(state.get("setup_done", True))
        if self.main and state.get("shards") != self.manifest.get("fingerprint"):
            console.warn(f"resuming on other shards than the run started with ({self.manifest['path']})")
        if state["steps_per_epoch"] != self.steps_per_epoch:
            if self.main:
                console.warn(
                    f"the checkpoint counted {state['steps_per_epoch']} steps per epoch, this run has "
                    f"{self.steps_per_epoch}: the current epoch restarts from its first batch"
                )
            self.position = 0
        rngs = state["rng"]
        if len(rngs) != self.world and self.main:
            console.warn(
                f"the checkpoint was written by {len(rngs)} processes, this run has {self.world}: training continues, "
                "but not bit-for-bit as the original run would have"
            )
        ckpt.set_rng_state(rngs[self.rank % len(rngs)])

    # -------------------------------------------------------------------------- outputs

    def _snapshot(self) -> dict:
        """Everything a resume needs. Collective: every rank must call it (RNG states are gathered)."""
        rngs = [ckpt.rng_state()]
        if self.world > 1:
            rngs = [None] * self.world
            torch.distributed.all_gather_object(rngs, ckpt.rng_state())
        return {
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "position": self.position,
            "steps_per_epoch": self.steps_per_epoch,
            "shards": self.manifest.get("fingerprint"),
            "window": self.window.state(),
            "setup_done": self.setup_done,
            "rng": rngs,
            "world_size": self.world,
            "recipe": self.recipe_text,
        }

    def save_checkpoint(self) -> None:
        state = self._snapshot()
        if self.main:
            ckpt.save(self.ckpt_path, state)
        self._saved_step = self.step

    def save_encoder(self) -> None:
        if not self.main:
            return
        aug, enc = self.cfg["augment"], self.cfg["encoder"]
        save_encoder(
            self.out / "encoder.safetensors", self.method.backbone,
            small_stem=bool(enc.get("small_stem", False)), input_size=int(aug["crop_size"]),
            mean=list(self.mean), std=list(self.std), recipe=self.cfg["recipe"]["name"],
            inputs={"shards": self.manifest["path"]},
        )

    def write_metrics(self, record: dict) -> None:
        if self.main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    # -------------------------------------------------------------------------- the loop

    def run(self) -> Path:
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "recipe.toml", self.recipe_text)
            ckpt.truncate_metrics(self.metrics_path, self.step)  # entries past the checkpoint go
        # A live bar (images/s, ETA) on a terminal, for rank 0; the log lines say the same in files.
        with _StopSignals() as signals, console.progress("images") as self.bar:
            self.bar_task = self.bar.add_task("pretrain", total=self.last_step * self.batch, completed=self.step * self.batch,
                                              visible=self.main)
            if not self.setup_done:
                self._setup(signals)
            while self.step < self.last_step:
                self._epoch(signals)
        if self._saved_step != self.step:
            self.save_checkpoint()
        self.save_encoder()
        if self.main:
            console.log(f"done: {self.step} steps; encoder {self.out / 'encoder.safetensors'}")
        return self.out

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def _batches(self, epoch: int, start: int) -> Iterator[list[torch.Tensor]]:
        """This epoch's view batches on the device, from batch `start` on (the loader skips the
        earlier ones without decoding them).

        The main process's RNGs are put back after every fetch, so the loader (which draws worker
        base seeds when its iterator starts, and augments in this process with workers=0) never
        shifts the training's random stream: a resumed run draws exactly what the original did.
        Views made here (--views batch-on-device) draw from a generator seeded by (seed, epoch,
        rank, batch), for the same reason."""
        self.loader.set_epoch(epoch, start)
        it = iter(self.loader)
        for index in range(start, self.steps_per_epoch):
            saved = ckpt.rng_state()
            batch = next(it, None)
            ckpt.set_rng_state(saved)
            if batch is None:
                return
            images, _labels = batch
            if self.batch_views is None:  # the loader made the views
                yield [v.to(self.device, non_blocking=True, memory_format=self._memory_format(v)) for v in images]
            else:
                yield self._views_of_batch(images, epoch, index)

    def _views_of_batch(self, images: torch.Tensor | list[torch.Tensor], epoch: int, index: int) -> list[torch.Tensor]:
        """The views of one uint8 batch (or list of images of different sizes), made on the device."""
        if isinstance(images, torch.Tensor):
            images = images.to(self.device, non_blocking=True)
        else:
            images = [im.to(self.device, non_blocking=True) for im in images]
        seed = zlib.crc32(f"{self.seed}:{epoch}:{self.rank}:{index}".encode())
        views = seeded_call(self.batch_views, images, seed, keep_rng=True)
        return [v.contiguous(memory_format=self._memory_format(v)) for v in views]

    def _memory_format(self, v: torch.Tensor) -> torch.memory_format:
        return torch.channels_last if self.channels_last and v.ndim == 4 else torch.preserve_format

    def _setup(self, signals: _StopSignals) -> None:
        """Method.setup before epoch 0 (AdCo's ad_init) on its own pass over the data; the
        checkpoint written afterwards keeps a resume from running it twice. A signal during
        setup stops it at the next batch: a half-done setup cannot be saved, so the resumed
        run starts it again, and the job exits within a batch system's grace period."""
        if type(self.method).setup is Method.setup:
            self.setup_done = True
            return

        def until_signal(batches: Iterator[list[torch.Tensor]]) -> Iterator[list[torch.Tensor]]:
            while True:
                views = self._next_views(batches, signals)
                if self._agree(signals.signum is not None):
                    signum = signals.signum or signal.SIGTERM
                    raise Interrupted(signum, f"stopped by {signal.Signals(signum).name} during the method's setup "
                                              "(before step 1); nothing to save. Run the same command again to restart it.")
                if views is None:
                    return
                yield views

        if self.main:
            console.log(f"{type(self.method).__name__}: setup pass over the data before step 1")
        self.method.train()
        with self._autocast():
            used = self.method.setup(until_signal(self._batches(epoch=-1, start=0)))
        self.setup_done = True
        if self.main:
            console.log(f"method setup used {used} batches")
        self.save_checkpoint()

    def _epoch(self, signals: _StopSignals) -> None:
        """Steps until the epoch ends or the run's last step. A signal stops the run between
        steps: every rank agrees on it before the next step starts, so all save the same step."""
        self.method.train()
        batches = self._batches(self.epoch, self.position)
        while self.step < self.last_step:
            t_fetch = time.perf_counter()
            views = self._next_views(batches, signals)
            if self._agree(signals.signum is not None):
                self._interrupted(signals.signum)
            if views is None:
                raise RunError(f"the loader ended after {self.position} of the epoch's {self.steps_per_epoch} batches "
                               f"(epoch {self.epoch + 1}); were the shards in {self.shards} changed during the run?")
            t_ready = time.perf_counter()
            scalars = self._train_step(views)
            self.step, self.position = self.step + 1, self.position + 1
            epoch_done = self.position == self.steps_per_epoch
            if epoch_done:
                self.epoch, self.position = self.epoch + 1, 0
            if self._agree(not math.isfinite(scalars["loss"])):
                self._fail_nonfinite(scalars)
            self.window.add(scalars, t_ready - t_fetch, time.perf_counter() - t_fetch)
            self.bar.update(self.bar_task, completed=self.step * self.batch,
                            description=f"epoch {self.epoch + (self.position > 0)}/{self.epochs} loss {scalars['loss']:.4f}")
            if self.step % self.log_every == 0 or epoch_done or self.step == self.last_step:
                self._log()
            if epoch_done:
                self._epoch_end()
                return
            if self.step % self.checkpoint_every == 0:
                self.save_checkpoint()

    @staticmethod
    def _next_views(batches: Iterator[list[torch.Tensor]], signals: _StopSignals) -> list[torch.Tensor] | None:
        """The next batch; None at the end of the data, or when the fetch failed after a stop
        signal: Ctrl-C and torchrun's SIGTERM also reach the loader's workers, so such a failure
        is the signal, not a data error (the caller's `_agree` then stops the run)."""
        try:
            return next(batches)
        except StopIteration:
            return None
        except Exception:
            if signals.signum is None:
                raise
            return None

    def _interrupted(self, signum: int | None) -> None:
        if self._saved_step != self.step:
            self.save_checkpoint()
        signum = signum or signal.SIGTERM  # the signal reached another rank: report SIGTERM
        raise Interrupted(
            signum,
            f"stopped by {signal.Signals(signum).name} after step {self.step}; checkpoint saved to "
            f"{self.ckpt_path}. Run the same command again to resume.",
        )

    def _train_step(self, views: list[torch.Tensor]) -> dict[str, float]:
        progress = Progress(step=self.step, total_steps=self.total_steps, epoch=self.epoch, steps_per_epoch=self.steps_per_epoch)
        lr = self._lr(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.method.before_forward(progress)
        with self._autocast():
            out = self.step_fn(views)
        self.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        self.method.before_optimizer_step(progress)
        self.optimizer.step()
        self.method.after_optimizer_step(progress)
        # One host sync per step: a bad loss must be caught before a checkpoint could keep it.
        # Logged values are the global batch's: the mean over ranks (a loss is a per-rank mean).
        scalars = dist.all_reduce_mean(torch.stack([value.detach().float() for value in out.values()]))
        return dict(zip(out, scalars.tolist()))

    def _agree(self, flag: bool) -> bool:
        """True on every rank when it is true on any (a signal or a bad loss stops all at one step)."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    def _lr(self, step: int) -> float:
        return lr_at(step, self.steps_per_epoch, self.cfg["schedule"], self.peak_lr)

    def _fail_nonfinite(self, scalars: dict[str, float]) -> None:
        lr = self._lr(self.step - 1)
        causes = [f"the learning rate ({lr:.4g} at this step) is too high: try --set optim.lr=<a tenth of it>"]
        if self.amp:
            causes.append("bf16 autocast lost range or precision in the loss: rerun with bf16 off to check")
        if self.step <= 1:
            causes.append("it failed on the first step: check the inputs' normalisation and the recipe's temperatures")
        kept = (f"the last good checkpoint {self.ckpt_path} (step {self._saved_step}) is kept"
                if self._saved_step is not None else "no checkpoint was written yet")
        raise RunError(
            f"the loss became {scalars['loss']} at step {self.step} (epoch {self.epoch + 1}); {kept}. "
            f"Likely cause: {'; or '.join(causes)}"
        )

    def _log(self) -> None:
        w = self.window
        step_time = w.busy / max(1, w.steps_timed)
        record: dict[str, Any] = {"step": self.step, "epoch": self.epoch if self.position else self.epoch - 1}
        record.update({key: value / w.n for key, value in w.sums.items()})
        record["lr"] = self._lr(self.step - 1)
        record["images_per_s"] = round(self.batch / step_time, 2) if step_time > 0 else None
        record["data_wait_pct"] = round(100.0 * w.wait / w.busy, 2) if w.busy > 0 else None
        counts = self.loader.skipped() if hasattr(self.loader, "skipped") else {"shards": 0, "samples": 0}
        skipped = dist.all_reduce_sum(torch.tensor([counts["shards"], counts["samples"]], device=self.device))
        if skipped.any():  # what the ranks' loaders could not read so far (broken shards, replaced samples)
            record["skipped_shards"], record["skipped_samples"] = skipped.tolist()
        self.write_metrics(record)
        self.window = _Window()
        if self.main:
            known = ("step", "epoch", "loss", "lr", "images_per_s", "data_wait_pct")
            extras = "".join(f" {k} {v:.4g}" for k, v in record.items() if k not in known)
            console.log(
                f"epoch {record['epoch'] + 1}/{self.epochs} step {self.step}/{self.last_step} loss {record['loss']:.4f} "
                f"lr {record['lr']:.4g}{extras} {record['images_per_s'] or 0:,.0f} img/s data-wait "
                f"{record['data_wait_pct'] or 0:.1f}% ETA {_fmt_time(step_time * (self.last_step - self.step))}"
            )

    def _epoch_end(self) -> None:
        if self.monitor_split and self.epoch % self.monitor_every == 0:
            self._monitor()
        self.save_checkpoint()
        self.save_encoder()

    # -------------------------------------------------------------------------- kNN monitor

    @torch.no_grad()
    def _monitor(self) -> None:
        """Weighted kNN (PROTOCOLS.md E1) of the backbone features: bank = the train split,
        queries = the monitor split, both with the evaluation transform. Rank 0 computes it."""
        if self.main:
            from sslctl.evaluate.knn import weighted_knn

            size = int(self.cfg["augment"]["crop_size"])
            bank, bank_labels = self._embed_split("train", size)
            queries, query_labels = self._embed_split(self.monitor_split, size)
            ks = [min(k, len(bank)) for k in (20, 200)]  # PROTOCOLS.md E1's two defaults, capped by a small bank
            results = weighted_knn(bank, bank_labels, queries, query_labels, ks=ks, temperatures=(0.07, 0.1))
            record = {"step": self.step, "epoch": self.epoch - 1, "monitor": self.monitor_split}
            for r in results:
                record[f"knn_top1_k{r['k']}"] = r["top1"]
            self.write_metrics(record)
            console.log(
                f"monitor epoch {self.epoch}: kNN top-1 on {self.monitor_split} "
                + ", ".join(f"{r['top1']:.2f}% ({r['protocol']})" for r in results)
            )
        dist.barrier()

    def _embed_split(self, split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        loader = self._loader(split, eval_transform(size, self.mean, self.std), shuffle=False, rank=0, world_size=1)
        was_training = self.method.training
        self.method.eval()
        feats, labels = [], []
        for images, y in loader:
            x = images.to(self.device, non_blocking=True, memory_format=self._memory_format(images))
            with self._autocast():
                feats.append(self.method.embed(x).float().cpu())
            labels.append(y)
        self.method.train(was_training)
        return torch.cat(feats), torch.cat(labels)


def pretrain(
    shards: str | Path,
    cfg: dict,
    out_dir: str | Path,
    *,
    device: str = "auto",
    resume: str = "auto",
    seed: int = 0,
    workers: int | None = None,
    compile: bool | str = False,
    checkpoint_every: int = CHECKPOINT_EVERY,
    log_every: int = LOG_EVERY,
    monitor_split: str | None = None,
    monitor_every: int = 1,
    max_steps: int | None = None,
    channels_last: bool | None = None,
    amp: bool | None = None,
    recipe_file: str | None = None,
    views: str = "auto",
) -> Path:
    """Pretrain the recipe `cfg` (resolved by sslctl.recipes.load_recipe) on the shards' train
    split; write RUN_DIR (recipe.toml, checkpoints/last.pt, encoder.safetensors, metrics.jsonl)
    and return its path.

    resume: "auto" continues from RUN_DIR/checkpoints/last.pt when present (refusing a different
    recipe), "never" refuses an existing run. max_steps stops early without changing the lr
    schedule (which always spans the recipe's epochs). compile: True = torch.compile with Inductor,
    or a torch.compile backend's name ("aot_eager": the same graphs without code generation).
    amp / channels_last: None = measured
    default for the device. recipe_file names the recipe in error messages. views: how the
    training views are made, see `check_views_mode`.
    Raises UserError (exit 2), RunError (exit 1: NaN loss), Interrupted (exit 143 / 130)."""
    engine = Engine(
        shards, cfg, out_dir, device=device, resume=resume, seed=seed, workers=workers, compile=compile,
        checkpoint_every=checkpoint_every, log_every=log_every, monitor_split=monitor_split,
        monitor_every=monitor_every, max_steps=max_steps, channels_last=channels_last, amp=amp, recipe_file=recipe_file,
        views=views,
    )
    return engine.run()
