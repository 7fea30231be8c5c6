"""Optimisers and schedules from a recipe's [optim] and [schedule] (docs/spec/methods.md §0.4, §0.5).

- `build_optimizer`: SGD (coupled L2 weight decay), LARS as in SimCLR, AdamW / Adam, over the
  parameter groups a Method declares (`ParamGroup`). `exclude_bn_bias` keeps 1-D parameters (BN
  weights/biases, biases) out of weight decay, and for LARS out of the trust-ratio adaptation too
  (default: on for LARS, off for SGD / Adam).
- `lr_at`: the lr of one step: linear warmup, then cosine (per step or per epoch), step decay at
  milestones, or constant. The loop writes it into every param group before `optimizer.step()`.
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
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001, adapt: bool = True):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, adapt=adapt)
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
                updates = torch._foreach_mul(grads, list((trust * group["lr"]).unbind()))
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


def build_optimizer(params, optim_cfg: dict, lr: float) -> torch.optim.Optimizer:
    """The optimiser named by [optim] `name` (sgd | lars | adamw | adam) at peak lr `lr`, over
    `params` as `declared_groups` reads them.

    Each declared group becomes one or two param groups: with `exclude_bn_bias` its 1-D tensors
    (BN weights and biases, all biases) go to a second one without weight decay (and, for LARS,
    without trust ratio), unless the declared group sets those itself. Each group's "lr" is then
    overwritten every step by the loop with `lr_at(...)`."""
    name = optim_cfg.get("name", "sgd")
    wd = float(optim_cfg.get("weight_decay", 0.0))
    exclude = bool(optim_cfg.get("exclude_bn_bias", name == "lars"))
    groups = []
    for declared in declared_groups(params):
        trainable = [p for _, p in declared.params if p.requires_grad]

        def options(flat: bool) -> dict:
            return {"weight_decay": (0.0 if flat else wd) if declared.weight_decay is None else declared.weight_decay,
                    "adapt": (not flat) if declared.adapt is None else declared.adapt}

        flat = [exclude and p.ndim <= 1 for p in trainable]
        if not any(flat) or options(False) == options(True):
            parts = [(options(False), trainable)]
        else:
            parts = [(options(False), [p for p, f in zip(trainable, flat) if not f]),
                     (options(True), [p for p, f in zip(trainable, flat) if f])]
        groups += [{"params": ps, **opts} for opts, ps in parts if ps]
    if not groups:
        raise UserError("the optimiser has no trainable parameters (every parameter has requires_grad=False)")
    momentum = float(optim_cfg.get("momentum", 0.9))
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, eta=float(optim_cfg.get("trust_coefficient", 0.001)))
    for g in groups:
        g.pop("adapt")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=bool(optim_cfg.get("nesterov", False)))
    if name in ("adamw", "adam"):
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        betas = tuple(float(b) for b in optim_cfg.get("betas", (0.9, 0.999)))
        return cls(groups, lr=lr, betas=betas, eps=float(optim_cfg.get("eps", 1e-8)))
    raise UserError(f"optim.name = '{name}' must be one of sgd, lars, adamw, adam")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


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
    if "warmup_steps" in schedule_cfg:
        warm = int(schedule_cfg["warmup_steps"])
    else:
        warm = round(float(schedule_cfg.get("warmup_epochs", 0)) * spe)
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


def cosine_tau(base_tau: float, step: int, total_steps: int) -> float:
    """BYOL's target momentum: 1 - (1 - base) * (cos(pi k / K) + 1) / 2, from base at k=0 to 1 at k=K."""
    k = min(max(step, 0), total_steps)
    return 1.0 - (1.0 - base_tau) * (math.cos(math.pi * k / max(1, total_steps)) + 1.0) / 2.0
