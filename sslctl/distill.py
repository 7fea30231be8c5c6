"""`sslctl distill`: SimCLR v2's self-distillation (docs/spec/methods.md §2d) of a fine-tuned teacher.

    TEACHER (an `sslctl finetune` run) + SHARDS (labels unused) -> RUN_DIR of the student

The student (the teacher's backbone or a smaller one, `--student resnet18`, trained from scratch,
with a linear classifier on its pooled features) learns the teacher's softened predictions on
the unlabelled images, both seeing the same augmented view (crop + flip):

    L_KD = -t^2 mean_x sum_y softmax(f_T(x) / t)_y log softmax(f_S(x) / t)_y        (the colab's t^2 weight)
    L    = alpha L_KD + (1 - alpha) L_CE(labelled subset of the teacher)           (alpha = 1: no labels)

With alpha < 1 every step also takes a batch of the teacher's labelled subset (its labelled/
shards). The teacher is frozen in eval mode and stored in the checkpoint, so a run resumes on
its own. The optimisation is not in the spec ([P]); the defaults are SimCLR v2's pretraining
ones (LARS, lr 0.1 x sqrt(batch), wd 1e-4, every weight matrix adapted, the student's classifier
included), 100 epochs, 5 of warmup.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from sslctl import checkpoint as ckpt
from sslctl.augment import build_views
from sslctl.data import load_manifest, make_loader
from sslctl.encoders import build_encoder
from sslctl.errors import UserError
from sslctl.finetune import SUBSET_DIR, FineTune, log_top1, read_run, resolve_stage_recipe, stage_options
from sslctl.losses.contrastive import fp32
from sslctl.methods.base import Method
from sslctl.run_data import RunData
from sslctl.train import Engine

OPTIM = {"name": "lars", "batch_size": 256, "lr": 0.1, "base_batch": 256, "scaling": "sqrt", "momentum": 0.9,
         "weight_decay": 1e-4, "exclude_bn_bias": True, "trust_coefficient": 0.001}
SCHEDULE = {"epochs": 100, "warmup_epochs": 5, "lr_schedule": "cosine", "per": "step", "final_lr": 0.0, "milestones": []}


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """t^2 x mean over the batch of CE(softmax(teacher / t), softmax(student / t)), in fp32.

    The t^2 keeps the gradient's scale independent of t (Hinton et al.), as in SimCLR v2's colab."""
    with fp32(student_logits.device):
        targets = F.softmax(teacher_logits.float() / temperature, dim=1)
        log_p = F.log_softmax(student_logits.float() / temperature, dim=1)
        return temperature**2 * -(targets * log_p).sum(dim=1).mean()


class Distill(Method):
    """Student backbone + linear classifier against a frozen FineTune teacher.
    Views: [images] or, with alpha < 1, [images, labelled images, labels] (`with_labelled_batches`).

    One parameter group (the default): the student's classifier starts random and learns with its
    backbone, LARS-adapted like every weight matrix. Kept out of the trust ratio (as FineTune's)
    it would take LARS's raw lr (0.1 x sqrt(batch), sized for trust-scaled steps ~1000x smaller)
    and, on 10 classes, diverge in a few steps."""

    n_views = 1

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        method = cfg["method"]
        self.temperature, self.alpha = float(cfg["loss"]["temperature"]), float(method["alpha"])
        self.teacher = FineTune(cfg["teacher"])
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.backbone = build_encoder(cfg["encoder"])
        self.classifier = nn.Linear(self.backbone.feature_dim, int(cfg["teacher"]["method"]["num_classes"]))

    def train(self, mode: bool = True) -> "Distill":
        super().train(mode)
        self.teacher.eval()  # the teacher's BN keeps its running statistics
        return self

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x))

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        x = views[0]
        with torch.no_grad():
            teacher = self.teacher.logits(x)
        if len(views) == 3:  # one student pass over unlabelled + labelled images
            logits = self.logits(torch.cat([x, views[1]]))
            student, labelled = logits[: len(x)], logits[len(x):]
        else:
            student = self.logits(x)
        kd = distillation_loss(student, teacher, self.temperature)
        out = {"kd": kd.detach(), "agree": (student.argmax(1) == teacher.argmax(1)).float().mean().detach()}
        if len(views) == 3:
            ce = F.cross_entropy(labelled.float(), views[2])
            out.update(loss=self.alpha * kd + (1 - self.alpha) * ce, ce=ce.detach())
        else:
            out["loss"] = kd
        return out

    def load_initial_weights(self) -> None:
        """The teacher's fine-tuned weights; the student starts from its seeded random init."""
        source = Path(self.cfg["method"]["teacher"])
        self.teacher.load_state_dict(ckpt.load(ckpt.checkpoint_path(source))["model"])


class _WithLabelledBatch:
    """The Engine's loader (unlabelled views) plus, per batch, a batch of the labelled subset.

    The labelled loader cycles on its own epochs; its position is a function of the global step
    (epoch * len + batch), so a resumed run draws the same labelled batches."""

    def __init__(self, loader, labelled):
        self.loader, self.labelled = loader, labelled
        self._step = 0

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.loader.set_epoch(epoch, start_batch)
        self._step = epoch * len(self.loader) + start_batch

    def _cycle(self):
        epoch, batch = divmod(self._step, len(self.labelled))
        while True:
            self.labelled.set_epoch(epoch, batch)
            yield from self.labelled
            epoch, batch = epoch + 1, 0

    def __iter__(self):
        labelled = self._cycle()
        for (views, labels), (labelled_views, y) in zip(self.loader, labelled):
            yield [*views, *labelled_views, y], labels


def with_labelled_batches(subset: Path):
    """The Engine's `wrap_loader` adding, per batch, a batch of the teacher's labelled subset (same
    views and normalisation, this process's share of the global batch)."""
    labelled = load_manifest(subset)
    n = labelled["splits"]["train"]["count"]

    def wrap(data: RunData, loader) -> _WithLabelledBatch:
        per_rank = min(data.batch_per_rank, n // data.world)
        if per_rank < 1:
            raise UserError(f"{subset}: {n} labelled images cannot feed {data.world} processes")
        views = build_views(data.cfg["augment"], data.mean, data.std)
        return _WithLabelledBatch(loader, make_loader(labelled, "train", batch_size=per_rank, transform=views,
                                                      workers=data.workers, seed=data.seed + 1, rank=data.rank,
                                                      world_size=data.world))

    return wrap


def distill(
    teacher: str | Path,
    shards: str | Path,
    out: str | Path,
    *,
    student: str | None = None,
    temperature: float = 1.0,
    alpha: float = 1.0,
    eval_split: str | None = "test",
    overrides: Iterable[str] = (),
    **options,
) -> Path:
    """Distil the fine-tuned TEACHER into a `student` backbone on the shards' train split; write
    and return the student's run dir `out`. `options`: RunOptions' fields (device, resume, seed,
    workers, max_steps, ...). Raises UserError for bad inputs."""
    teacher, out = Path(teacher), Path(out)
    opts = stage_options(options, out)
    teacher_cfg, _ = read_run(teacher, "the teacher is a finished `sslctl finetune` run")
    if teacher_cfg["recipe"]["method"] != "sslctl.finetune:FineTune":
        raise UserError(
            f"{teacher}: a {teacher_cfg['recipe']['method']} run, not a fine-tuned one; "
            f"distillation needs class predictions: run `sslctl finetune {teacher} SHARDS --out FT` and distil FT"
        )
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"--alpha {alpha}: expected a weight in [0, 1] (1: distillation only)")
    if temperature <= 0:
        raise UserError(f"--temperature {temperature}: expected a positive number")
    cfg = {
        "recipe": {"name": f"{teacher_cfg['recipe']['name']}_distill", "method": "sslctl.distill:Distill",
                   "description": f"student of {teacher}"},
        "augment": dict(teacher_cfg["augment"]),  # fine-tuning's crop + flip, the teacher's normalisation
        "encoder": {"name": student or teacher_cfg["encoder"]["name"], "small_stem": teacher_cfg["encoder"].get("small_stem", False)},
        "head": {},
        "method": {"teacher": str(teacher.resolve()), "alpha": float(alpha)},
        "loss": {"name": "distillation", "temperature": float(temperature)},
        "optim": dict(OPTIM),
        "schedule": dict(SCHEDULE),
        "teacher": teacher_cfg,  # the teacher's architecture: the run resumes without the teacher's directory
    }
    cfg = resolve_stage_recipe(cfg, overrides, "distill")
    # alpha = 1: views only (the unlabelled shards' labels, if any, are never used)
    wrap = with_labelled_batches(teacher / SUBSET_DIR) if cfg["method"]["alpha"] < 1.0 else None
    engine = Engine(shards, cfg, out, opts, wrap_loader=wrap)
    engine.run()
    log_top1(engine, load_manifest(shards), eval_split)
    return out
