"""DINO: self-DIstillation with NO labels (Caron et al. 2021); recipes/dino.toml. Follows
facebookresearch/dino main_dino.py, utils.py and vision_transformer.py (DINOHead):

    student: s = g(f(x)) of every crop     f the backbone, g the DINO head (below)
    teacher: t = g'(f'(x)) of the 2 global crops only, an EMA copy under no_grad in train mode
    P_t = softmax((t - c) / T_t)           centred by c, sharpened by T_t (warmed up per epoch)
    loss = mean over (global crop i, other crop v != i) of  -sum_k P_t(i) log softmax(s(v) / T_s)
    c <- m_c c + (1 - m_c) mean of t over the GLOBAL batch     (all-reduced over processes)
    before the optimizer step: each parameter's gradient clipped to norm `clip_grad`, and the
        prototypes' gradient dropped for the first `freeze_last_layer_epochs`
    after it: teacher <- m teacher + (1 - m) student, m from base_momentum to 1 by a per-step cosine

DINO head: MLP Linear-GELU (x len(projector_hidden), BN optional) -> Linear to the bottleneck
(`projector`), L2-normalise, then a weight-normalised Linear without bias to K prototypes
(`prototypes`; with norm_last_layer its rows stay unit vectors). Linear weights trunc-normal(0.02),
biases 0, as the official head.

Crops of one resolution go through the backbone as one batch (the official MultiCropWrapper), so a
ResNet's BN sees both global crops together; a timm ViT is built with dynamic_img_size = true for
local crops of another size unless the recipe says otherwise (position embeddings interpolated per
size, as DINO's own ViT does). The teacher's backbone is built without stochastic depth
(drop_path_rate 0), as the official code builds it.

Deviations: none in the algorithm. The weight-decay schedule is the loop's (optim.weight_decay_end);
images are normalised with the shards' or ImageNet's statistics as everywhere in sslctl.
"""

from __future__ import annotations

import copy
from itertools import groupby

import torch
import torch.nn.functional as F
from torch import nn

from sslctl import distributed as dist
from sslctl.encoders import build_encoder, build_multi_crop_encoder, is_timm
from sslctl.errors import UserError
from sslctl.losses.distillation import dino_cross_entropy, teacher_targets
from sslctl.methods.base import Method, Progress, expect
from sslctl.optim import cosine_tau
from sslctl.siamese import embedding_std, ema_update, momentum_copy, use_sync_bn


class WeightNormLinear(nn.Module):
    """Linear without bias with weight g * v / |v| per output row (torch's weight_norm at dim 0).
    `learn_norm` false keeps g at 1 (DINO's norm_last_layer): every row a unit vector."""

    def __init__(self, in_dim: int, out_dim: int, learn_norm: bool):
        super().__init__()
        self.weight_v = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=learn_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_g * F.normalize(self.weight_v, dim=1))


def dino_mlp(in_dim: int, hidden: list[int], out_dim: int, norm: bool) -> nn.Sequential:
    """The DINO head's MLP: Linear(-BN)-GELU per hidden width, then Linear to the bottleneck."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), *([nn.BatchNorm1d(width)] if norm else []), nn.GELU()]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    for layer in layers:
        if isinstance(layer, nn.Linear):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


def teacher_temperature(epoch: int, warmup: float, final: float, warmup_epochs: int) -> float:
    """The official schedule: np.linspace(warmup, final, warmup_epochs) for the first epochs, then final."""
    if epoch >= warmup_epochs:
        return final
    return warmup if warmup_epochs == 1 else warmup + (final - warmup) * epoch / (warmup_epochs - 1)


class DINO(Method):
    def __init__(self, cfg: dict):
        super().__init__(cfg)
        aug, enc, head, method, loss = (cfg[k] for k in ("augment", "encoder", "head", "method", "loss"))
        expect(cfg, "loss", "name", ("dino",))
        if int(aug.get("views", 2)) != 2:
            raise UserError(f"recipe augment.views = {aug['views']}: DINO's teacher takes 2 global crops; "
                            "add local crops with augment.extra_crops")
        self.n_views = 2 + int(aug.get("extra_crops", 0))
        sizes = {int(aug["crop_size"])} | ({int(aug["extra_crop_size"])} if self.n_views > 2 else set())
        self.backbone = build_multi_crop_encoder(enc, sizes)
        self.projector = dino_mlp(self.backbone.feature_dim, list(head["projector_hidden"]), int(head["projector_dim"]),
                                  bool(head["projector_norm"]))
        self.prototypes = WeightNormLinear(int(head["projector_dim"]), int(head["prototypes"]),
                                           learn_norm=not bool(head["norm_last_layer"]))
        sync = bool(method["sync_bn"])
        self.backbone, self.projector = use_sync_bn(self.backbone, sync), use_sync_bn(self.projector, sync)
        self.teacher = momentum_copy(self._teacher_network(enc, sync))
        self.register_buffer("center", torch.zeros(1, int(head["prototypes"])))

        self.base_momentum = float(method["base_momentum"])
        self.center_momentum = float(method["center_momentum"])
        self.clip_grad = float(method["clip_grad"])
        self.freeze_last_layer_epochs = float(method["freeze_last_layer_epochs"])
        self.student_temperature = float(loss["student_temperature"])
        self.temperatures = (float(loss["warmup_teacher_temperature"]), float(loss["teacher_temperature"]),
                             int(loss["warmup_teacher_temperature_epochs"]))
        self._teacher_temperature = teacher_temperature(0, *self.temperatures)

    def _teacher_network(self, enc: dict, sync: bool) -> nn.Sequential:
        """The student's copy, with a backbone built without stochastic depth (timm's drop_path_rate)."""
        student = self.student_modules()
        if not (is_timm(enc["name"]) and float(enc.get("drop_path_rate", 0.0)) > 0):
            return copy.deepcopy(student)
        backbone = use_sync_bn(build_encoder({**enc, **self.backbone.options, "drop_path_rate": 0.0}), sync)
        teacher = nn.Sequential(backbone, copy.deepcopy(self.projector), copy.deepcopy(self.prototypes))
        teacher.load_state_dict(student.state_dict())
        return teacher

    def student_modules(self) -> nn.Sequential:
        return nn.Sequential(self.backbone, self.projector, self.prototypes)

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        bs = views[0].shape[0]
        # One backbone pass per resolution: the 2 global crops together, then the local ones.
        h = torch.cat([self.backbone(torch.cat(list(same))) for _, same in groupby(views, key=lambda v: v.shape[-2:])])
        z = self.projector(h)
        student = self.prototypes(F.normalize(z, dim=-1))
        with torch.no_grad():
            teacher = self.teacher(torch.cat(views[:2]))
            targets = teacher_targets(teacher, self.center, self._teacher_temperature)
        loss = dino_cross_entropy(student, targets, len(views), self.student_temperature)
        self.update_center(teacher)
        entropy = -(targets * targets.clamp_min(1e-12).log()).sum(dim=-1).mean()
        return {"loss": loss, "z_std": embedding_std(z[:bs]), "teacher_entropy": entropy}

    @torch.no_grad()
    def update_center(self, teacher: torch.Tensor) -> None:
        """c <- m c + (1 - m) * the mean teacher score of the global batch (equal batches per rank)."""
        batch_center = dist.all_reduce_mean(teacher.float().mean(dim=0, keepdim=True))
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)

    def before_forward(self, progress: Progress) -> None:
        self._teacher_temperature = teacher_temperature(progress.epoch, *self.temperatures)

    @torch.no_grad()
    def before_optimizer_step(self, progress: Progress) -> None:
        grads = [p.grad for p in self.student_modules().parameters() if p.grad is not None]
        if self.clip_grad > 0 and grads:  # utils.clip_gradients: each tensor's own norm
            norms = torch.stack(torch._foreach_norm(grads))
            torch._foreach_mul_(grads, list((self.clip_grad / (norms + 1e-6)).clamp(max=1.0).unbind()))
        if progress.step < round(self.freeze_last_layer_epochs * progress.steps_per_epoch):
            for p in self.prototypes.parameters():  # utils.cancel_gradients_last_layer
                p.grad = None

    def after_optimizer_step(self, progress: Progress) -> None:
        momentum = cosine_tau(self.base_momentum, progress.step, progress.total_steps)
        ema_update(self.teacher.parameters(), self.student_modules().parameters(), momentum)


METHOD = DINO
