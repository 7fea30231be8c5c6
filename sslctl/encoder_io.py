"""`encoder.safetensors`: backbone weights with torchvision (or timm) key names, plus what embed needs.

The file loads with strict=True into `torchvision.models.get_model(arch, **options)` after
`apply_small_stem` (when small_stem) and `strip_classifier`, or for arch "timm:NAME" into
`timm.create_model(NAME, num_classes=0, **options)` — see `load_encoder`.
Metadata (safetensors allows str -> str only; lists and dicts are JSON):
    format="sslctl-encoder", arch, small_stem ("true"/"false"), feature_dim, input_size,
    mean, std (JSON lists), recipe (name), provenance (JSON), options (JSON: the network's
    constructor options: a timm model's img_size, patch_size, ..., a torchvision ViT's
    image_size, a custom net's widths; see sslctl/encoders.py)
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from sslctl.artifacts import provenance, save_safetensors
from sslctl.encoders import build_backbone
from sslctl.errors import UserError

FORMAT = "sslctl-encoder"


def save_encoder(
    path: str | Path,
    backbone: nn.Module,
    *,
    small_stem: bool,
    input_size: int,
    mean: list[float],
    std: list[float],
    recipe: str,
    inputs: dict | None = None,
) -> Path:
    meta = {
        "format": FORMAT,
        "arch": backbone.arch,
        "small_stem": str(bool(small_stem)).lower(),
        "feature_dim": str(backbone.feature_dim),
        "options": json.dumps(getattr(backbone, "options", {})),
        "input_size": str(int(input_size)),
        "mean": json.dumps([float(m) for m in mean]),
        "std": json.dumps([float(s) for s in std]),
        "recipe": recipe,
        "provenance": json.dumps(provenance(inputs)),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    return save_safetensors(path, tensors, meta)


def read_metadata(path: str | Path) -> dict:
    """The decoded metadata of an sslctl encoder file; UserError for anything else."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path}: not a readable safetensors file ({err})") from None
    if meta.get("format") != FORMAT:
        raise UserError(
            f"{path}: not an sslctl encoder (metadata format={meta.get('format')!r}, expected {FORMAT!r}); "
            "pass a run directory or the encoder.safetensors that `sslctl pretrain` wrote"
        )
    return {
        "arch": meta["arch"],
        "small_stem": meta["small_stem"] == "true",
        "feature_dim": int(meta["feature_dim"]),
        "options": json.loads(meta.get("options", "{}")),
        "input_size": int(meta["input_size"]),
        "mean": json.loads(meta["mean"]),
        "std": json.loads(meta["std"]),
        "recipe": meta.get("recipe", ""),
        "provenance": json.loads(meta.get("provenance", "{}")),
    }


def load_encoder(path: str | Path) -> tuple[nn.Module, dict]:
    """(backbone with weights loaded strictly, metadata)."""
    meta = read_metadata(path)
    backbone = build_backbone(meta["arch"], small_stem=meta["small_stem"], **meta["options"])
    backbone.load_state_dict(load_file(str(path)), strict=True)
    return backbone, meta
