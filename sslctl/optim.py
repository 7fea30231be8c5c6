"""Optimisers and schedules from a recipe's [optim] and [schedule] (docs/spec/methods.md §0.4, §0.5).

- `build_optimizer`: SGD (coupled L2 weight decay), LARS as in SimCLR, AdamW / Adam, over the
  parameter groups a Method declares (`ParamGroup`). `exclude_bn_bias` keeps 1-D parameters (norm
  weights/biases, biases) and the ones a model names in `no_weight_decay()` (timm ViTs: pos_embed,
  cls_token) out of weight decay, and for LARS out of the trust-ratio adaptation too (default: on
  for LARS, off for SGD / Adam). `bias_lr_scale` runs those same parameters at that multiple of
  the lr (Barlow Twins: 0.0048 / 0.2); a group declared `fixed_lr` stays at the peak lr, never
  warmed up or decayed (SimSiam's predictor); `trust_clip` caps LARS's per-tensor lr at the lr
  (LARC's clip mode).
- `lr_at`: the lr of one step: linear warmup, then cosine (per step or per epoch), step decay at
  milestones, or constant. The loop writes it into the param groups with `set_lr` before
  `optimizer.step()`.
- `weight_decay_at`: DINO's cosine weight-decay schedule (`optim.weight_decay_end`); the loop
  writes it with `set_weight_decay` into the groups that take [optim]'s weight decay.
- `cosine_tau`: BYOL's momentum schedule, tau rising from tau_base to 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from sslctl.errors import UserError


class LARS(torch.optim.Optimizer):
    """LARS as in SimCLR (tf2/lars_optimizer.py), per parameter tensor w with gradient g:

        g <- g + wd * w                        (unless the group has weight_decay 0)
        trust = eta * |w| / |g|  (1 if a norm is 0, or if the group is excluded from adaptation)
        m <- momentum * m + lr * trust * g     (the lr sits inside the momentum buffer)
        w <- w - m

    `clip` (apex LARC's clip mode, solo-learn's `clip_lr`): the adapted tensors' rate lr * trust
    becomes min(trust, lr), i.e. the trust ratio itself is the per-tensor lr, capped at the lr.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001,
                 adapt: bool = True, clip: bool = False):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, adapt=adapt, clip=clip)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # Multi-tensor (foreach) ops over the whole group instead of ~8 small ops per tensor:
            # bitwise the same weights as a per-tensor loop (3 steps of ResNet-18), far fewer
            # kernel launches on a GPU; on the CPU the update is memory-bound either way (~25 ms).
            params = [w for w in group["params"] if w.grad is not None]
            if not params:
                continue
            grads = [w.grad for w in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            if group["adapt"]:
                w_norm, g_norm = torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(grads))
                # stays on the device: no GPU->CPU sync per parameter
                trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, torch.ones_like(w_norm))
                rate = trust.clamp(max=group["lr"]) if group.get("clip") else trust * group["lr"]
                updates = torch._foreach_mul(grads, list(rate.unbind()))
            else:
                updates = torch._foreach_mul(grads, group["lr"])
            bufs = []
            for w in params:
                state = self.state[w]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(w)
                bufs.append(state["momentum_buffer"])
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, updates)
            torch._foreach_sub_(params, bufs)
        return loss


@dataclass
class ParamGroup:
    """Trainable parameters that the optimiser treats alike (Method.param_groups declares them).

    A field left None follows [optim]: the recipe's `weight_decay`, and LARS's trust ratio on,
    except that with `exclude_bn_bias` 1-D tensors (BN weights, biases) get neither."""

    params: list[tuple[str, nn.Parameter]]  # (name, parameter); frozen ones are skipped
    weight_decay: float | None = None  # 0.0: no weight decay (e.g. a ViT's pos_embed and cls_token)
    adapt: bool | None = None  # False: kept out of LARS's trust ratio (e.g. a zero-initialised classifier)
    fixed_lr: bool = False  # True: at the peak lr throughout, no warmup or decay (SimSiam's predictor)


def declared_groups(params) -> list[ParamGroup]:
    """A Method (its `param_groups()`), a module (one group), ParamGroups, or an iterable of
    (name, param) pairs or bare parameters (one group)."""
    if isinstance(params, nn.Module):
        declared = getattr(params, "param_groups", None)
        return declared() if callable(declared) else [ParamGroup(list(params.named_parameters()))]
    items = list(params)
    if items and all(isinstance(g, ParamGroup) for g in items):
        return items
    return [ParamGroup([p if isinstance(p, tuple) else (f"param{i}", p) for i, p in enumerate(items)])]


def no_weight_decay_names(module: nn.Module) -> set[str]:
    """Dotted names of the parameters a model asks to keep out of weight decay: timm models'
    `no_weight_decay()` (a ViT's pos_embed, cls_token), found on any submodule."""
    names = set()
    for prefix, sub in module.named_modules():
        if callable(getattr(sub, "no_weight_decay", None)):
            names |= {f"{prefix}.{n}" if prefix else n for n in sub.no_weight_decay()}
    return names


def build_optimizer(params, optim_cfg: dict, lr: float) -> torch.optim.Optimizer:
    """The optimiser named by [optim] `name` (sgd | lars | adamw | adam) at peak lr `lr`, over
    `params` as `declared_groups` reads them.

    Each declared group becomes one or two param groups: its 1-D tensors (norm weights and biases,
    all biases) and the model's `no_weight_decay_names` go to a second one where [optim] treats
    them apart: with `exclude_bn_bias` without weight decay (and, for LARS, without trust ratio),
    unless the declared group sets those itself; with `bias_lr_scale` at that
    multiple of the lr ("lr_scale"). A `fixed_lr` group carries "fixed_lr"; a group whose weight
    decay is [optim]'s carries "scheduled_wd". Each group's "lr" is then overwritten every step
    by the loop with `set_lr(optimizer, lr_at(...), peak_lr)`, which reads "lr_scale" and
    "fixed_lr", and with `optim.weight_decay_end` its weight decay by `set_weight_decay`."""
    name = optim_cfg.get("name", "sgd")
    wd = float(optim_cfg.get("weight_decay", 0.0))
    exclude = bool(optim_cfg.get("exclude_bn_bias", name == "lars"))
    bias_scale = float(optim_cfg.get("bias_lr_scale", 1.0))
    scheduled = "weight_decay_end" in optim_cfg
    skip = no_weight_decay_names(params) if isinstance(params, nn.Module) else set()
    groups = []
    for declared in declared_groups(params):
        trainable = [(n, p) for n, p in declared.params if p.requires_grad]

        def options(apart: bool) -> dict:
            flat = exclude and apart
            opts = {"weight_decay": (0.0 if flat else wd) if declared.weight_decay is None else declared.weight_decay,
                    "adapt": (not flat) if declared.adapt is None else declared.adapt}
            if apart and bias_scale != 1.0:
                opts["lr_scale"] = bias_scale
            if declared.fixed_lr:
                opts["fixed_lr"] = True
            if scheduled and declared.weight_decay is None and not flat:
                opts["scheduled_wd"] = True
            return opts

        apart = [p.ndim <= 1 or n in skip for n, p in trainable]
        if not any(apart) or options(False) == options(True):
            parts = [(options(False), [p for _, p in trainable])]
        else:
            parts = [(options(False), [p for (_, p), a in zip(trainable, apart) if not a]),
                     (options(True), [p for (_, p), a in zip(trainable, apart) if a])]
        groups += [{"params": ps, **opts} for opts, ps in parts if ps]
    if not groups:
        raise UserError("the optimiser has no trainable parameters (every parameter has requires_grad=False)")
    momentum = float(optim_cfg.get("momentum", 0.9))
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, eta=float(optim_cfg.get("trust_coefficient", 0.001)),
                    clip=bool(optim_cfg.get("trust_clip", False)))
    for g in groups:
        g.pop("adapt")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=bool(optim_cfg.get("nesterov", False)))
    if name in ("adamw", "adam"):
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        betas = tuple(float(b) for b in optim_cfg.get("betas", (0.9, 0.999)))
        return cls(groups, lr=lr, betas=betas, eps=float(optim_cfg.get("eps", 1e-8)))
    raise UserError(f"optim.name = '{name}' must be one of sgd, lars, adamw, adam")


def set_lr(optimizer: torch.optim.Optimizer, lr: float, peak_lr: float | None = None) -> None:
    """The step's lr into every param group: times the group's "lr_scale"; a "fixed_lr" group
    (SimSiam's predictor) gets `peak_lr` instead of the scheduled lr (without one, `lr`)."""
    for group in optimizer.param_groups:
        base = peak_lr if group.get("fixed_lr") and peak_lr is not None else lr
        group["lr"] = base * group.get("lr_scale", 1.0)


def set_weight_decay(optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
    """The step's weight decay (`weight_decay_at`) into the groups that take [optim]'s weight decay
    ("scheduled_wd"); groups kept out of weight decay stay at 0."""
    for group in optimizer.param_groups:
        if group.get("scheduled_wd"):
            group["weight_decay"] = weight_decay


def warmup_steps(schedule_cfg: dict, steps_per_epoch: int) -> int:
    """The warm-up's length in steps: `warmup_steps` when given, else `warmup_epochs` epochs."""
    if "warmup_steps" in schedule_cfg:
        return int(schedule_cfg["warmup_steps"])
    return round(float(schedule_cfg.get("warmup_epochs", 0)) * max(1, int(steps_per_epoch)))


def warmup_outlasting(schedule_cfg: dict, steps_per_epoch: int, last_step: int) -> str | None:
    """A warning with its fix when the warm-up does not end before the run's last step."""
    warm = warmup_steps(schedule_cfg, steps_per_epoch)
    if warm < last_step:
        return None
    key = "warmup_steps" if "warmup_steps" in schedule_cfg else "warmup_epochs"
    fix = (f"--set schedule.warmup_steps={max(1, last_step // 10)}" if key == "warmup_steps"
           else f"--set schedule.warmup_epochs={round(last_step / 10 / steps_per_epoch, 2)}")
    return (f"the lr warm-up lasts {warm} steps (schedule.{key} = {schedule_cfg[key]}) but this run ends at step "
            f"{last_step}: the lr never reaches its peak and the run learns little; a tenth of the run is a common "
            f"warm-up: {fix}")


def lr_at(step: int, steps_per_epoch: int, schedule_cfg: dict, peak_lr: float) -> float:
    """Learning rate at global step `step` (0-based).

    Warmup (`warmup_epochs`, or `warmup_steps` when given) ramps linearly per step from
    `warmup_start_lr` (default 0) to `peak_lr`; at step == warmup steps the lr is the peak. Then
    `lr_schedule`:
      cosine:   final + (peak - final) * (1 + cos(pi * t)) / 2, t the fraction of the post-warmup
                steps done (`per = "step"`) or of the post-warmup epochs started (`per = "epoch"`,
                MoCo/AdCo: e = 0 .. E-1 counted at the epoch's start).
      step:     peak * gamma ** (number of `milestones` epochs reached), gamma default 0.1.
      constant: peak.
    `final_lr` and `warmup_start_lr` are absolute (not batch-scaled)."""
    spe = max(1, int(steps_per_epoch))
    epochs = float(schedule_cfg["epochs"])
    total = max(1, round(epochs * spe))
    warm = warmup_steps(schedule_cfg, spe)
    if step < warm:
        start = float(schedule_cfg.get("warmup_start_lr", 0.0))
        return start + (peak_lr - start) * step / warm
    kind = schedule_cfg.get("lr_schedule", "cosine")
    if kind == "constant":
        return peak_lr
    if kind == "step":
        gamma = float(schedule_cfg.get("gamma", 0.1))
        epoch = step / spe
        return peak_lr * gamma ** sum(1 for m in schedule_cfg.get("milestones", []) if epoch >= m)
    if kind == "cosine":
        final = float(schedule_cfg.get("final_lr", 0.0))
        if schedule_cfg.get("per", "step") == "epoch":
            warm_epochs = warm / spe
            t = (step // spe - warm_epochs) / max(1e-12, epochs - warm_epochs)
        else:
            t = (step - warm) / max(1, total - warm)
        t = min(max(t, 0.0), 1.0)
        return final + (peak_lr - final) * 0.5 * (1.0 + math.cos(math.pi * t))
    raise UserError(f"schedule.lr_schedule = '{kind}' must be one of cosine, step, constant")


def weight_decay_at(step: int, total_steps: int, optim_cfg: dict) -> float:
    """[optim]'s weight decay at global step `step`: `weight_decay` throughout, or with
    `weight_decay_end` a per-step cosine from `weight_decay` at step 0 to `weight_decay_end` at
    the last step (DINO's utils.cosine_scheduler, no warmup)."""
    start = float(optim_cfg.get("weight_decay", 0.0))
    if "weight_decay_end" not in optim_cfg:
        return start
    end, t = float(optim_cfg["weight_decay_end"]), min(max(step, 0), total_steps) / max(1, total_steps)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def cosine_tau(base_tau: float, step: int, total_steps: int) -> float:
    """BYOL's target momentum: 1 - (1 - base) * (cos(pi k / K) + 1) / 2, from base at k=0 to 1 at k=K."""
    k = min(max(step, 0), total_steps)
    return 1.0 - (1.0 - base_tau) * (math.cos(math.pi * k / max(1, total_steps)) + 1.0) / 2.0
