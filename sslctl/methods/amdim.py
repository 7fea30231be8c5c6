"""AMDIM: Augmented Multiscale Deep InfoMax (Bachman, Hjelm, Buchwalter 2019), and with it every
method that contrasts the feature maps of two views by NCE. docs/spec/methods.md §6; recipes/amdim.toml.
YADIM (§8, recipes/yadim.toml) is this file with another `compare` list: it has no code of its own.

The five parts (Falcon & Cho):
  1. augmentation: [augment]; AMDIM's one flip shared by both views is `shared_flip = true`.
  2. encoder: [encoder]; the AMDIM encoder (sslctl/nets/amdim.py) gives maps "1", "5", "7"
     (1x1, 5x5, 7x7, all n_rkhs channels) and "last" (= "1"); a torchvision ResNet gives
     "layer1" .. "layer4" and "last" (= "layer4") through `encoders.feature_maps`.
  3. representation extraction: [method] compare = ["SRC>TGT", ...]. For each pair, the source
     is ONE random location of view A's SRC map (the global vector when SRC is 1x1) and the
     targets are all locations of view B's TGT map; then again from B to A, and the two
     directions are averaged. AMDIM: ["1>5", "1>7", "5>5"]; YADIM: ["last>last"].
  4. similarity: dot product / sqrt(d), soft-clipped by tclip * tanh(s / tclip).
  5. loss: NCE with every location of the image's own target map a positive and all locations
     of the other images the negatives (`losses.local.map_nce`), plus score_reg * mean(s^2).
     loss = sum over pairs of (NCE + regulariser).
Nothing happens outside backprop.

`global_negatives` gathers the target maps over ranks with gradient (the original ran under
DataParallel, so its negatives were the whole batch); in one process it changes nothing.
Left out: AMDIM's online linear/MLP classifiers on detached features (they need labels, which
pretraining does not read; `sslctl knn` / `sslctl linear` evaluate the encoder instead).
"""

from __future__ import annotations

import torch

from sslctl import distributed as dist
from sslctl.encoders import feature_maps
from sslctl.errors import UserError
from sslctl.losses.local import map_nce, random_location
from sslctl.methods.base import Method, expect, similarity_of
from sslctl.encoders import build_encoder
from sslctl.siamese import embedding_std


RESNET_MAPS = ("layer1", "layer2", "layer3", "layer4", "last")  # via encoders.feature_maps


def parse_pairs(compare: list[str]) -> list[tuple[str, str]]:
    """["1>5", "last>last"] -> [("1", "5"), ("last", "last")]."""
    pairs = []
    for item in compare:
        src, sep, tgt = str(item).partition(">")
        if not sep or not src.strip() or not tgt.strip():
            raise UserError(f"recipe method.compare: {item!r} is not a comparison; write \"SOURCE>TARGET\", e.g. \"1>5\"")
        pairs.append((src.strip(), tgt.strip()))
    if not pairs:
        raise UserError("recipe method.compare is empty; list at least one comparison, e.g. [\"last>last\"]")
    return pairs


class AMDIM(Method):
    def __init__(self, cfg: dict):
        super().__init__(cfg)
        method, loss = cfg["method"], cfg["loss"]
        expect(cfg, "loss", "name", ("nce",))
        self.similarity = similarity_of(cfg, ("dot",))
        self.pairs = parse_pairs(method["compare"])
        self.global_negatives = bool(method["global_negatives"])
        self.tclip = float(loss["tclip"])
        self.score_reg = float(loss["score_reg"])
        self.backbone = build_encoder(cfg["encoder"])
        self.used = tuple(dict.fromkeys([name for pair in self.pairs for name in pair] + ["last"]))
        names = self.map_names()
        for name in self.used:
            if name not in names:
                raise UserError(
                    f"recipe method.compare: encoder {cfg['encoder']['name']!r} has no feature map {name!r}; "
                    f"its maps are {', '.join(names) or 'none (use amdim or a ResNet)'}"
                )
        # Local-map MLPs no comparison uses (YADIM compares r1 only) are frozen: under DDP a
        # parameter that never gets a gradient would stall the all-reduce.
        for name, mlp in getattr(self.backbone, "rkhs", {}).items():
            if name not in self.used:
                mlp.requires_grad_(False)

    def map_names(self) -> tuple[str, ...]:
        if hasattr(self.backbone, "forward_maps"):
            return self.backbone.map_names
        return RESNET_MAPS if hasattr(self.backbone, "layer4") else ()

    def maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """name -> B x d x H x W feature map of the encoder."""
        if hasattr(self.backbone, "forward_maps"):
            return self.backbone.forward_maps(x, self.used)
        out = dict(zip(RESNET_MAPS[:4], feature_maps(self.backbone, x)))
        out["last"] = out["layer4"]
        return out

    def compare(self, a: dict, b: dict, src: str, tgt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """NCE and regulariser of view a's source vectors against view b's target map."""
        targets = self.similarity(b[tgt])
        first = 0
        if self.global_negatives:
            first = dist.rank() * targets.shape[0]
            targets = dist.gather_with_grad(targets)
        return map_nce(self.similarity(random_location(a[src])), targets, clip=self.tclip, reg_weight=self.score_reg, first=first)

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        m1, m2 = (self.maps(v) for v in views)
        total = views[0].new_zeros((), dtype=torch.float32)
        logs = {}
        for src, tgt in self.pairs:
            nce_ab, reg_ab = self.compare(m1, m2, src, tgt)
            nce_ba, reg_ba = self.compare(m2, m1, src, tgt)
            nce, reg = 0.5 * (nce_ab + nce_ba), 0.5 * (reg_ab + reg_ba)
            total = total + nce + reg
            logs[f"nce_{src}>{tgt}"] = nce.detach()
            logs[f"reg_{src}>{tgt}"] = reg.detach()
        return {"loss": total, **logs, "z_std": embedding_std(m1["last"].mean(dim=(2, 3)))}


METHOD = AMDIM
