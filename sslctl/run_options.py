"""How a training run runs, as opposed to what it computes (the recipe).

One `RunOptions` serves every training stage: `sslctl pretrain` / `train.pretrain`, `sslctl
finetune` / `finetune.finetune` and `sslctl distill` / `distill.distill` all hand it to
`train.Engine`. A bad value is a UserError (exit 2) naming the command-line flag.
"""

from __future__ import annotations

from dataclasses import dataclass

from sslctl.errors import UserError

CHECKPOINT_EVERY = 500  # steps; also at every epoch end
LOG_EVERY = 20  # steps; also at every epoch end

# How the training views are made (docs/performance.md):
#   auto       (the default) in the loader's workers: a batch of one image shape, at most 128 x 128
#              px, as `batch`; any other batch as `per-image`
#   per-image  torchvision v2, image by image, in the loader's workers
#   batch      sslctl/augment_batch.py's BatchViews on each whole uint8 batch, in the workers
#              (B1, 32 px: 1.05-1.19x per-image's images/s on the 2-core CPU, 1.15-1.54x on an
#              H200, where per-image views starve the GPU)
VIEW_MODES = ("auto", "per-image", "batch")


@dataclass(frozen=True)
class RunOptions:
    device: str = "auto"  # auto, cpu, cuda or cuda:N (sslctl.devices.resolve_device)
    resume: str = "auto"  # auto: continue OUT/checkpoints/last.pt (same recipe); never: refuse an existing run
    seed: int = 0  # initialisation, data order and augmentation
    workers: int | None = None  # loader processes per process; None: sslctl.data.default_workers
    compile: bool | str = False  # torch.compile: True = Inductor, or a backend's name ("aot_eager")
    checkpoint_every: int = CHECKPOINT_EVERY
    log_every: int = LOG_EVERY
    monitor_split: str | None = None  # a labelled split the monitor scores (the Engine's `monitor`)
    monitor_every: int = 1  # epochs
    max_steps: int | None = None  # stop early; the lr schedule still spans the recipe's epochs
    channels_last: bool | None = None  # None: sslctl.devices.CHANNELS_LAST
    amp: bool | None = None  # bf16 autocast; None: sslctl.devices.default_amp(device)
    recipe_file: str | None = None  # names the recipe in error messages (None: the recipe's name)
    views: str = "auto"  # VIEW_MODES

    def __post_init__(self) -> None:
        if self.resume not in ("auto", "never"):
            raise UserError(f"--resume {self.resume}: expected auto or never")
        if self.views not in VIEW_MODES:
            raise UserError(f"--views {self.views}: expected one of {', '.join(VIEW_MODES)}")
        for flag, value in (("--checkpoint-every", self.checkpoint_every), ("--log-every", self.log_every),
                            ("--monitor-every", self.monitor_every), ("--max-steps", self.max_steps)):
            if value is not None and value < 1:
                raise UserError(f"{flag} {value}: expected a positive number of steps/epochs")
        if self.workers is not None and self.workers < 0:
            raise UserError(f"--workers {self.workers}: expected 0 (load in the training process) or more")
