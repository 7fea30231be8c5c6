"""Optimisers and schedules from a recipe's [optim] and [schedule] (docs/spec/methods.md §0.4, §0.5).

- `build_optimizer`: SGD (coupled L2 weight decay), LARS as in SimCLR, AdamW / Adam.
  `exclude_bn_bias` keeps 1-D parameters (BN weights/biases, biases) out of weight decay, and for
  LARS out of the trust-ratio adaptation too (default: on for LARS, off for SGD / Adam).
- `lr_at`: the lr of one step: linear warmup, then cosine (per step or per epoch), step decay at
  milestones, or constant. The loop writes it into every param group before `optimizer.step()`.
- `cosine_tau`: BYOL's momentum schedule, tau rising from tau_base to 1.
"""

from __future__ import annotations

import math
from typing import Iterable

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


def _named(params) -> list[tuple[str, nn.Parameter]]:
    """A Method / module (its trainable parameters) or an iterable of (name, param) or params."""
    if isinstance(params, nn.Module):
        items = list(params.named_parameters())
    else:
        items = [p if isinstance(p, tuple) else (f"param{i}", p) for i, p in enumerate(params)]
    return [(n, p) for n, p in items if p.requires_grad]


def build_optimizer(method_or_named_params: nn.Module | Iterable, optim_cfg: dict, lr: float) -> torch.optim.Optimizer:
    """The optimiser named by [optim] `name` (sgd | lars | adamw | adam) at peak lr `lr`.

    Parameters are split in two groups: 1-D tensors (BN weights and biases, all biases) and the
    rest. With `exclude_bn_bias` the 1-D group gets no weight decay (and, for LARS, no trust ratio).
    Each group's "lr" is then overwritten every step by the loop with `lr_at(...)`."""
    name = optim_cfg.get("name", "sgd")
    wd = float(optim_cfg.get("weight_decay", 0.0))
    exclude = bool(optim_cfg.get("exclude_bn_bias", name == "lars"))
    named = _named(method_or_named_params)
    if not named:
        raise UserError("the optimiser has no trainable parameters (every parameter has requires_grad=False)")
    decay = [p for _, p in named if not (exclude and p.ndim <= 1)]
    no_decay = [p for _, p in named if exclude and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": wd}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "adapt": False})
    momentum = float(optim_cfg.get("momentum", 0.9))
    if name == "sgd":
        for g in groups:
            g.pop("adapt", None)
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=bool(optim_cfg.get("nesterov", False)))
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, eta=float(optim_cfg.get("trust_coefficient", 0.001)))
    if name in ("adamw", "adam"):
        for g in groups:
            g.pop("adapt", None)
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
