"""The training loop of every training stage: it knows nothing of any one method (DESIGN.md §3).

One step, for any Method (contract in sslctl/methods/base.py):

    lr = lr_at(step)                       written into every param group
    method.before_forward(progress)
    out = method.training_step(views)      under bf16 autocast where it helps
    out["loss"].backward()
    method.before_optimizer_step(progress)
    optimizer.step()
    method.after_optimizer_step(progress)

Around it: the global batch split over ranks (DDP wraps the Method itself, see
distributed.data_parallel), checkpoints that resume exactly (sslctl/checkpoint.py),
metrics.jsonl and progress lines (sslctl/metrics_log.py), SIGTERM/SIGINT -> checkpoint -> exit
143/130 (sslctl/stop.py), a stop on a NaN/inf loss, and the encoder export. Rank 0 alone writes.

`Engine(shards, cfg, out, options)` is one run (options: sslctl/run_options.py; the data:
sslctl/run_data.py). A stage that is not pretraining adds what it needs through the Method's
declarations (base.py: param_groups, load_initial_weights) and two hooks: `wrap_loader(data,
loader)` (extra entries in the views: finetune's labels, distill's labelled batch) and `monitor`
(scores the train split's and `options.monitor_split`'s features at epoch ends:
sslctl.evaluate.knn.knn_monitor for `sslctl pretrain --monitor`).

Exact resume: data order and augmentation are functions of (seed, epoch, position) (sslctl/data.py),
every RNG of the main process is checkpointed, and a resumed epoch skips the batches already
consumed, so on the CPU a resumed run's losses equal an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from sslctl import checkpoint as ckpt
from sslctl import console
from sslctl import distributed as dist
from sslctl.artifacts import atomic_write_text, remove_stale_temps
from sslctl.data import ShardLoader
from sslctl.devices import CHANNELS_LAST, default_amp, enable_fast_kernels, resolve_device, use_fast_attention
from sslctl.encoder_io import save_encoder
from sslctl.errors import RunError, UserError
from sslctl.methods import Method, Progress, build_method, method_defaults
from sslctl.metrics_log import MetricsLog, Window
from sslctl.optim import build_optimizer, lr_at, set_lr, set_weight_decay, warmup_outlasting, weight_decay_at
from sslctl.recipes import recipe_to_toml, scaled_lr
from sslctl.run_data import RunData
from sslctl.run_lock import hold_run_dir
from sslctl.run_options import RunOptions
from sslctl.stop import StopSignals, agree, next_views, until_agreed_stop

# (bank features, bank labels, query features, query labels, split=the queries' split) ->
# (metrics.jsonl entries, a log line); the bank is the train split
Monitor = Callable[..., tuple[dict, str]]
# (the run's data, its training loader) -> a loader with the same len() and set_epoch(epoch, start_batch)
# whose batches are (views, labels) like the loader's (FineTune: its labels appended to the views)
LoaderWrapper = Callable[[RunData, ShardLoader], ShardLoader]


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class Engine:
    """One training run of the recipe `cfg` on the shards' train split, into the run dir `out`."""

    def __init__(self, shards: str | Path, cfg: dict, out: str | Path, options: RunOptions = RunOptions(), *,
                 monitor: Monitor | None = None, wrap_loader: LoaderWrapper | None = None):
        self.options, self.cfg, self.shards, self.out = options, cfg, shards, Path(out)  # shards: a path or a URL
        self.device = resolve_device(options.device)
        enable_fast_kernels(self.device)
        dist.init_from_env(self.device.type)
        self.rank, self.world = dist.rank(), dist.world_size()
        self.main = self.rank == 0
        if not self.main:
            console.set_quiet(True)  # rank 0 alone logs (methods log too, e.g. AdCo's ad_init); warnings still show
        self.amp = default_amp(self.device) if options.amp is None else options.amp
        self.channels_last = CHANNELS_LAST if options.channels_last is None else options.channels_last
        self.recipe_text = recipe_to_toml(cfg)
        self.ckpt_path = ckpt.checkpoint_path(self.out)
        self.log = MetricsLog(self.out / "metrics.jsonl", self.main)
        # Resume decision first: a mismatch must fail before minutes of setup.
        state = ckpt.state_to_resume(self.out, options.resume, self.recipe_text,
                                     options.recipe_file or cfg["recipe"]["name"], implied=method_defaults(cfg))

        self.data = RunData(shards, cfg, options, rank=self.rank, world=self.world, device=self.device,
                            channels_last=self.channels_last, index_dir=self.out, wrap_loader=wrap_loader)
        self.batch, self.steps_per_epoch = self.data.batch, self.data.steps_per_epoch
        if options.monitor_split is not None:
            self.data.check_labelled_split(options.monitor_split, "--monitor")
            if monitor is None:
                raise UserError(f"--monitor {options.monitor_split}: no monitor was handed to the Engine "
                                "(e.g. sslctl.evaluate.knn.knn_monitor)")
        self.monitor = monitor
        self.epochs = int(cfg["schedule"]["epochs"])
        self.total_steps = self.epochs * self.steps_per_epoch
        self.last_step = self.total_steps if options.max_steps is None else min(self.total_steps, options.max_steps)

        # Model: identical initialisation on every rank (seed), then per-rank RNG streams.
        _seed_all(options.seed)
        self.method = build_method(cfg)
        if self.data.views_per_image != self.method.n_views:
            raise UserError(f"recipe augment.views (+ extra_crops) makes {self.data.views_per_image} views per image; "
                            f"method {cfg['recipe']['method']!r} takes {self.method.n_views}")
        if state is None:
            self.method.load_initial_weights()
        self.method.to(self.device)
        use_fast_attention(self.method, self.device)
        if self.channels_last:
            self.method.to(memory_format=torch.channels_last)
        self.peak_lr, lr_message = scaled_lr(cfg)
        self.optimizer = build_optimizer(self.method, cfg["optim"], self.peak_lr)
        _seed_all(options.seed * 1000 + self.rank + 1)
        self.step = self.epoch = self.position = 0
        self.saved_step: int | None = None  # the step of the checkpoint on disk
        self.setup_done = False
        if state is not None:
            self._restore(state)
            del state  # the model and optimizer hold their own copies now
        self.step_fn = dist.data_parallel(self.method, self.device, options.compile)
        self._announce(lr_message)

    # -------------------------------------------------------------------------- construction

    def _restore(self, state: dict) -> None:
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.epoch, self.position = int(state["step"]), int(state["epoch"]), int(state["position"])
        self.saved_step = self.step
        self.log.window = Window(state.get("window"))
        self.setup_done = bool(state.get("setup_done", True))
        if self.main and state.get("shards") != self.data.manifest.get("fingerprint"):
            console.warn(f"resuming on other shards than the run started with ({self.data.manifest['path']})")
        if state["steps_per_epoch"] != self.steps_per_epoch:
            if self.main:
                console.warn(f"the checkpoint counted {state['steps_per_epoch']} steps per epoch, this run has "
                             f"{self.steps_per_epoch}: the current epoch restarts from its first batch")
            self.position = 0
        ckpt.restore_rng_states(state["rng"], self.rank, self.world, warn=self.main)

    def _announce(self, lr_message: str) -> None:
        if not self.main:
            return
        cfg, views = self.cfg, self.options.views
        console.log(
            f"pretrain {cfg['recipe']['name']} (variant {cfg['recipe'].get('variant', 'none')}) on {self.device}"
            f"{f' x {self.world} processes' if self.world > 1 else ''}: batch {self.batch} global"
            f"{f' = {self.data.batch_per_rank} per process' if self.world > 1 else ''}, {lr_message}, "
            f"{self.steps_per_epoch} steps/epoch x {self.epochs} epochs, bf16 {'on' if self.amp else 'off'}, "
            f"channels_last {'on' if self.channels_last else 'off'}, {self.data.workers} loader workers "
            f"({'--workers' if self.options.workers is not None else 'the cores less one, at most 16; --workers N to change'}), "
            f"views {views}"
        )
        if warning := warmup_outlasting(cfg["schedule"], self.steps_per_epoch, self.last_step):
            console.warn(warning)
        if self.saved_step is not None:
            console.log(f"resuming {self.ckpt_path} at step {self.step} (epoch {self.epoch + 1}, batch {self.position})")

    # -------------------------------------------------------------------------- outputs

    def save_checkpoint(self) -> None:
        """Everything a resume needs. Collective: every rank must call it (RNG states are gathered)."""
        state = {
            "model": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
            "step": self.step, "epoch": self.epoch, "position": self.position, "steps_per_epoch": self.steps_per_epoch,
            "shards": self.data.manifest.get("fingerprint"), "window": self.log.window.state(), "setup_done": self.setup_done,
            "rng": ckpt.gather_rng_states(self.world), "world_size": self.world, "recipe": self.recipe_text,
        }
        if self.main:
            ckpt.save(self.ckpt_path, state)
        self.saved_step = self.step

    def save_encoder(self) -> None:
        if not self.main:
            return
        aug, enc = self.cfg["augment"], self.cfg["encoder"]
        save_encoder(
            self.out / "encoder.safetensors", self.method.backbone,
            small_stem=bool(enc.get("small_stem", False)), input_size=int(aug["crop_size"]),
            mean=list(self.data.mean), std=list(self.data.std), recipe=self.cfg["recipe"]["name"],
            inputs={"shards": self.data.manifest["path"]},
        )

    # -------------------------------------------------------------------------- the loop

    def run(self) -> Path:
        lock = hold_run_dir(self.out) if self.main else None  # one writer per run directory
        if self.main:  # what a killed writer left half-written
            for directory in (self.out, self.out / "checkpoints"):
                remove_stale_temps(directory)
        try:
            return self._run()
        finally:
            if lock is not None:
                lock.close()

    def _run(self) -> Path:
        if self.main:
            atomic_write_text(self.out / "recipe.toml", self.recipe_text)
        self.log.restart_at(self.step)  # entries past the checkpoint go
        # A live bar (images/s, ETA) on a terminal, for rank 0; the log lines say the same in files.
        with StopSignals() as signals, console.progress("images") as self.bar:
            self.bar_task = self.bar.add_task("pretrain", total=self.last_step * self.batch, completed=self.step * self.batch,
                                              visible=self.main)
            if not self.setup_done:
                self._setup(signals)
            while self.step < self.last_step:
                self._epoch(signals)
        if self.saved_step != self.step:
            self.save_checkpoint()
        self.save_encoder()
        if self.main:
            console.log(f"done: {self.step} steps; encoder {self.out / 'encoder.safetensors'}")
        return self.out

    def _setup(self, signals: StopSignals) -> None:
        """Method.setup before epoch 0 (AdCo's ad_init) on its own pass over the data; the
        checkpoint written afterwards keeps a resume from running it twice. A signal during
        setup stops it at the next batch: a half-done setup cannot be saved, so the resumed
        run starts it again, and the job exits within a batch system's grace period."""
        if type(self.method).setup is Method.setup:
            self.setup_done = True
            return
        if self.main:
            console.log(f"{type(self.method).__name__}: setup pass over the data before step 1")
        self.method.train()
        batches = until_agreed_stop(self.data.batches(epoch=-1, start=0), signals, self.agree,
                                    "during the method's setup (before step 1); nothing to save. "
                                    "Run the same command again to restart it.")
        with self.autocast():
            used = self.method.setup(batches)
        self.setup_done = True
        if self.main:
            console.log(f"method setup used {used} batches")
        self.save_checkpoint()

    def _epoch(self, signals: StopSignals) -> None:
        """Steps until the epoch ends or the run's last step. A signal stops the run between
        steps: every rank agrees on it before the next step starts, so all save the same step."""
        self.method.train()
        batches = self.data.batches(self.epoch, self.position)
        while self.step < self.last_step:
            t_fetch = time.perf_counter()
            views = next_views(batches, signals)
            if self.agree(signals.signum is not None):
                if self.saved_step != self.step:
                    self.save_checkpoint()
                raise signals.interrupted(f"after step {self.step}; checkpoint saved to {self.ckpt_path}. "
                                          "Run the same command again to resume.")
            if views is None:
                raise RunError(f"the loader ended after {self.position} of the epoch's {self.steps_per_epoch} batches "
                               f"(epoch {self.epoch + 1}); were the shards in {self.shards} changed during the run?")
            t_ready = time.perf_counter()
            scalars = self.train_step(views)
            self.step, self.position = self.step + 1, self.position + 1
            epoch_done = self.position == self.steps_per_epoch
            if epoch_done:
                self.epoch, self.position = self.epoch + 1, 0
            if self.agree(not math.isfinite(scalars["loss"])):
                raise nonfinite_loss(scalars["loss"], self)
            self.log.window.add(scalars, t_ready - t_fetch, time.perf_counter() - t_fetch)
            self.bar.update(self.bar_task, completed=self.step * self.batch,
                            description=f"epoch {self.epoch + (self.position > 0)}/{self.epochs} loss {scalars['loss']:.4f}")
            if self.step % self.options.log_every == 0 or epoch_done or self.step == self.last_step:
                self.log.flush(step=self.step, epoch=self.epoch if self.position else self.epoch - 1, lr=self.lr(self.step - 1),
                               batch=self.batch, epochs=self.epochs, last_step=self.last_step, extra=self.data.skipped())
            if epoch_done:
                self._epoch_end()
                return
            if self.step % self.options.checkpoint_every == 0:
                self.save_checkpoint()

    def train_step(self, views: list[torch.Tensor]) -> dict[str, float]:
        progress = Progress(step=self.step, total_steps=self.total_steps, epoch=self.epoch, steps_per_epoch=self.steps_per_epoch)
        set_lr(self.optimizer, self.lr(self.step), self.peak_lr)
        if "weight_decay_end" in self.cfg["optim"]:  # DINO's cosine weight decay
            set_weight_decay(self.optimizer, weight_decay_at(self.step, self.total_steps, self.cfg["optim"]))
        self.method.before_forward(progress)
        with self.autocast():
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

    def _epoch_end(self) -> None:
        if self.monitor is not None and self.epoch % self.options.monitor_every == 0:
            self._monitor()
        self.save_checkpoint()
        self.save_encoder()

    def _monitor(self) -> None:
        """The monitor on the backbone's features: bank = the train split, queries = the monitor
        split, both with the evaluation transform. Rank 0 computes it."""
        if self.main:
            split = self.options.monitor_split
            bank, queries = (self.data.features(self.method, s, bf16=self.amp) for s in ("train", split))
            record, message = self.monitor(*bank, *queries, split=split)
            self.log.write({"step": self.step, "epoch": self.epoch - 1, "monitor": split, **record})
            console.log(f"monitor epoch {self.epoch}: {message}")
        dist.barrier()

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def lr(self, step: int) -> float:
        return lr_at(step, self.steps_per_epoch, self.cfg["schedule"], self.peak_lr)

    def agree(self, flag: bool) -> bool:
        return agree(flag, self.world, self.device)


def nonfinite_loss(loss: float, run: Engine) -> RunError:
    """The stop on a NaN / inf loss: where it happened, what is kept, the likely causes."""
    causes = [f"the learning rate ({run.lr(run.step - 1):.4g} at this step) is too high: try --set optim.lr=<a tenth of it>"]
    if run.amp:
        causes.append("bf16 autocast lost range or precision in the loss: rerun with bf16 off to check")
    if run.step <= 1:
        causes.append("it failed on the first step: check the inputs' normalisation and the recipe's temperatures")
    kept = (f"the last good checkpoint {run.ckpt_path} (step {run.saved_step}) is kept"
            if run.saved_step is not None else "no checkpoint was written yet")
    return RunError(f"the loss became {loss} at step {run.step} (epoch {run.epoch + 1}); {kept}. "
                    f"Likely cause: {'; or '.join(causes)}")


def pretrain(shards: str | Path, cfg: dict, out: str | Path, *, monitor: Monitor | None = None, **options) -> Path:
    """Pretrain the recipe `cfg` (resolved by sslctl.recipes.load_recipe) on the shards' train
    split; write RUN_DIR (recipe.toml, checkpoints/last.pt, encoder.safetensors, metrics.jsonl)
    and return its path. `options`: RunOptions' fields (device, resume, seed, max_steps, ...);
    `monitor` scores `monitor_split` at epoch ends (sslctl.evaluate.knn.knn_monitor).
    Raises UserError (exit 2), RunError (exit 1: NaN loss), Interrupted (exit 143 / 130)."""
    return Engine(shards, cfg, out, RunOptions(**options), monitor=monitor).run()

