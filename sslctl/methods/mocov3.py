"""MoCo v3 (Chen, Xie, He 2021, "An Empirical Study of Training Self-Supervised Vision
Transformers"); recipes/mocov3.toml. Follows facebookresearch/moco-v3 moco/builder.py, vits.py
and main_moco.py:

    q = r(g(f(v)))                 online: backbone f, projector g, predictor r ([head])
    xi <- m xi + (1 - m) theta     momentum update of (f', g') BEFORE the keys, m from base_momentum
                                   to 1 by a per-step cosine (--moco-m-cos)
    k = g'(f'(v)) under no_grad, gathered over processes (no gradient)
    loss = ctr(q1, k2) + ctr(q2, k1),   ctr(q, k) = 2t * CE(q . k_all / t, rank * B + n)
                                   (q, k L2-normalised; the global batch's other keys the negatives)

Heads (builder.py _build_mlp): Linear without bias, BN, ReLU per hidden layer; the last Linear
without bias, then a BN without affine parameters (`*_last_norm`). ResNet: projector 2 layers,
predictor 2 layers without the last BN; ViT: projector 3 layers, predictor 2 layers with it.

ViT (vits.py): `method.stop_grad_conv1` re-initialises the patch projection (xavier-uniform
over its fan-in as a linear layer, zero bias) and freezes it (the "random patch projection");
`method.sincos_pos_embed` replaces the position embedding by the fixed 2-D sin-cos one (zero for
the class token), frozen. Both act on a timm ViT (patch_embed.proj, pos_embed) and keep its
state_dict keys, so the export still loads into timm. timm's weight_init = "moco" is the rest of
vits.py's initialisation (encoder option).

Each view goes through the networks as its own batch (BN per view), as in the official forward.
BN is SyncBN over the global batch with several processes (`method.sync_bn`), as the official
code converts the whole model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sslctl import distributed as dist
from sslctl.encoders import build_encoder
from sslctl.errors import UserError
from sslctl.heads import from_config
from sslctl.losses.contrastive import info_nce_in_batch
from sslctl.methods.base import Method, Progress, expect
from sslctl.optim import cosine_tau
from sslctl.siamese import embedding_std, ema_update, momentum_copy, use_sync_bn


def vit_patch_embed(backbone: nn.Module, key: str) -> nn.Module:
    """A timm ViT's patch embedding; UserError (naming the recipe key) for any other backbone."""
    embed = getattr(backbone, "patch_embed", None)
    if not isinstance(getattr(embed, "proj", None), nn.Conv2d) or getattr(backbone, "pos_embed", None) is None:
        raise UserError(f"recipe method.{key} = true applies to a timm ViT (patch_embed.proj, pos_embed); "
                        f"encoder {backbone.arch} has none: set --set method.{key}=false")
    return embed


@torch.no_grad()
def freeze_patch_projection(backbone: nn.Module) -> None:
    """vits.py: uniform(+-sqrt(6 / (3 p^2 + D))) weight, zero bias, requires_grad False."""
    proj = vit_patch_embed(backbone, "stop_grad_conv1").proj
    fan_in = proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
    bound = math.sqrt(6.0 / float(fan_in + proj.out_channels))
    proj.weight.uniform_(-bound, bound)
    if proj.bias is not None:
        proj.bias.zero_()
    proj.requires_grad_(False)


def sincos_position_embedding(grid: tuple[int, int], dim: int, prefix_tokens: int, temperature: float = 10000.0) -> torch.Tensor:
    """vits.py's fixed 2-D sin-cos embedding (1, prefix + h*w, dim), zeros for the class token."""
    if dim % 4:
        raise UserError(f"the 2-D sin-cos position embedding needs an embedding width divisible by 4, got {dim}")
    h, w = grid
    grid_w, grid_h = torch.meshgrid(torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    out_w, out_h = grid_w.flatten()[:, None] * omega, grid_h.flatten()[:, None] * omega
    emb = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    return torch.cat([torch.zeros(prefix_tokens, dim), emb])[None]


@torch.no_grad()
def use_sincos_pos_embed(backbone: nn.Module) -> None:
    embed = vit_patch_embed(backbone, "sincos_pos_embed")
    pos = backbone.pos_embed
    prefix = pos.shape[1] - embed.grid_size[0] * embed.grid_size[1]
    pos.copy_(sincos_position_embedding(tuple(embed.grid_size), pos.shape[2], prefix))
    pos.requires_grad_(False)


class MoCoV3(Method):
    def __init__(self, cfg: dict):
        super().__init__(cfg)
        method = cfg["method"]
        expect(cfg, "loss", "name", ("info_nce",))
        expect(cfg, "loss", "similarity", ("cosine",))
        self.temperature = float(cfg["loss"]["temperature"])
        self.base_momentum = float(method["base_momentum"])
        self.momentum = self.base_momentum  # of the step being taken (before_forward)
        self.backbone = build_encoder(cfg["encoder"])
        if bool(method["stop_grad_conv1"]):
            freeze_patch_projection(self.backbone)
        if bool(method["sincos_pos_embed"]):
            use_sincos_pos_embed(self.backbone)
        self.projector = from_config(self.backbone.feature_dim, cfg["head"], "projector")
        self.predictor = from_config(int(cfg["head"]["projector_dim"]), cfg["head"], "predictor")
        for name in ("backbone", "projector", "predictor"):
            setattr(self, name, use_sync_bn(getattr(self, name), bool(method["sync_bn"])))
        self.momentum_encoder = momentum_copy(nn.Sequential(self.backbone, self.projector))

    def online_parameters(self) -> list[nn.Parameter]:
        return [*self.backbone.parameters(), *self.projector.parameters()]

    def before_forward(self, progress: Progress) -> None:
        self.momentum = cosine_tau(self.base_momentum, progress.step, progress.total_steps)

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        x1, x2 = views
        z1 = self.projector(self.backbone(x1))
        q1, q2 = self.predictor(z1), self.predictor(self.projector(self.backbone(x2)))
        with torch.no_grad():
            ema_update(self.momentum_encoder.parameters(), self.online_parameters(), self.momentum)
            k1, k2 = (dist.gather_no_grad(F.normalize(self.momentum_encoder(x), dim=1)) for x in (x1, x2))
        q1, q2 = F.normalize(q1, dim=1), F.normalize(q2, dim=1)
        t, rank = self.temperature, dist.rank()
        loss = info_nce_in_batch(q1, k2, t, rank) + info_nce_in_batch(q2, k1, t, rank)
        return {"loss": loss, "z_std": embedding_std(z1)}


METHOD = MoCoV3
