"""The contract between a method and the training loop (train.py). The loop knows no method.

Falcon & Cho describe every method by five parts; a method file builds them from the recipe:
  1. augmentation  -> [augment]   (built by sslctl.augment; the loop hands the views in)
  2. encoder       -> [encoder]   (sslctl.encoders.build_encoder) -> `self.backbone`
  3. representation extraction -> [head]  (sslctl.heads) -> `self.projector` (+ predictor, prototypes)
  4. similarity    -> [loss] similarity (cosine / dot: sslctl.losses.similarity, `similarity_of`)
  5. loss          -> [loss] (pure functions in sslctl.losses)
and [method] holds what turns views into the training signal (queue, momentum target, bank).

Life of one step, as train.py drives it:
    method.before_forward(progress)          # e.g. SwAV: normalise prototypes
    out = method.training_step(views)        # under autocast; returns {"loss": scalar, ...}
    out["loss"].backward()
    method.before_optimizer_step(progress)   # e.g. SwAV: drop prototype grads while frozen
    optimizer.step()
    method.after_optimizer_step(progress)    # e.g. BYOL EMA, AdCo bank ascent
`progress` is a `Progress(step, total_steps, epoch, steps_per_epoch)`.

State: everything a method must resume with (queue, pointer, bank and its momentum buffer,
momentum/target encoder, prototypes) lives in parameters or registered buffers, so the loop's
`method.state_dict()` checkpoints it. Target/key networks and banks have requires_grad=False
so `trainable_parameters()` and `param_groups()` (what the optimiser gets) exclude them.

What a method may declare beyond the step (each has a default here, so a method that needs
none of it declares nothing):
  param_groups()          how the optimiser treats its parameters: a list of
                          sslctl.optim.ParamGroup, e.g. "no weight decay for these" (a ViT's
                          pos_embed and cls_token, timm's `no_weight_decay()`) or "neither weight
                          decay nor LARS's trust ratio" (FineTune's zero-initialised classifier);
                          `param_groups_apart` builds the usual two-group case.
                          Default: one group of every trainable parameter, under [optim]'s rules.
  load_initial_weights()  called on a fresh start only (a resume restores the checkpoint):
                          weights from another run (FineTune: the pretrained encoder; Distill: the
                          teacher). Default: none, the seeded initialisation stands.
  setup(batches)          runs once before epoch 0 with an iterator of view batches (AdCo's
                          ad_init); returns the number of batches it consumed.
  defaults                {section: {key: value}}: the value of a recipe key the method reads
                          when a recipe does not list it; load_recipe fills it in, and a run saved
                          before the key existed resumes with it (SimCLR's method.fused_views).

The views a method gets are the loader's: the recipe's [augment] views, plus whatever the
stage's loader wrapper adds (train.Engine's `wrap_loader`: FineTune's labels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn

from sslctl.errors import UserError
from sslctl.losses.similarity import SIMILARITIES
from sslctl.optim import ParamGroup


def expect(cfg: dict, section: str, key: str, supported: tuple) -> None:
    """Refuse a recipe value the method does not implement (e.g. another method's loss.name)."""
    if cfg[section][key] not in supported:
        raise UserError(
            f"recipe {section}.{key} = {cfg[section][key]!r} is not supported by method "
            f"{cfg['recipe']['method']!r}; use one of {', '.join(map(repr, supported))}"
        )


def similarity_of(cfg: dict, supported: tuple[str, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the recipe's loss.similarity makes of the embeddings before the loss's dot products
    (sslctl/losses/similarity.py); UserError for one the method does not implement."""
    expect(cfg, "loss", "similarity", supported)
    return SIMILARITIES[cfg["loss"]["similarity"]]


@dataclass(frozen=True)
class Progress:
    step: int  # global optimisation step, 0-based, of the step being taken
    total_steps: int
    epoch: int
    steps_per_epoch: int

    @property
    def fraction(self) -> float:
        return self.step / max(1, self.total_steps)


class Method(nn.Module):
    """Base class. Subclasses set `self.backbone` (and usually `self.projector`) in __init__."""

    #: augmented views per image training_step takes: the recipe's augment.views + extra_crops
    #: (the Engine refuses a recipe that makes another number, before any step)
    n_views: int = 2
    defaults: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg  # the fully resolved recipe (all sections)

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Views (each B x C x H x W, normalised floats) -> {"loss": scalar with graph, ...}.

        Other entries are detached scalars worth logging (e.g. "z_std" for collapse)."""
        raise NotImplementedError

    def before_forward(self, progress: Progress) -> None:
        pass

    def before_optimizer_step(self, progress: Progress) -> None:
        pass

    def after_optimizer_step(self, progress: Progress) -> None:
        pass

    def setup(self, batches: Iterator[list[torch.Tensor]]) -> int:
        return 0

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def param_groups(self) -> list[ParamGroup]:
        return [ParamGroup([(n, p) for n, p in self.named_parameters() if p.requires_grad])]

    def param_groups_apart(self, chosen: Callable[[str], bool], **options) -> list[ParamGroup]:
        """For a param_groups() override: the trainable parameters whose name is `chosen` in a group
        of their own with `options` (ParamGroup's weight_decay, adapt), after the rest. A ViT:
        `self.param_groups_apart(lambda n: n in ("backbone.pos_embed", "backbone.cls_token"), weight_decay=0.0)`."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        return [ParamGroup([(n, p) for n, p in named if not chosen(n)]),
                ParamGroup([(n, p) for n, p in named if chosen(n)], **options)]

    def load_initial_weights(self) -> None:
        pass

    def embed(self, x: torch.Tensor, layer: str = "backbone") -> torch.Tensor:
        """Features for evaluation: the pooled backbone output, or the projector's output."""
        h = self.backbone(x)
        return self.projector(h) if layer == "projector" else h
