"""The device a stage runs on and its measured precision defaults (docs/train.md, docs/performance.md).

    resolve_device("auto")     cuda when torch sees one (under torchrun: this process's LOCAL_RANK), else cpu
    default_amp(device)        bf16 autocast where it measured faster
    CHANNELS_LAST              the memory format default: on
    enable_fast_kernels(dev)   cuDNN autotuning and TF32 matmuls on CUDA (training)
    use_fast_attention(m, dev) timm attention as plain matmuls on the CPU (training)
"""

from __future__ import annotations

import os

import torch
from torch import nn

from sslctl.errors import UserError

# channels_last measured faster for ResNets on the CPU (oneDNN, in fp32 and bf16) and is the fast
# layout for bf16 convolutions on CUDA tensor cores: on for every device sslctl runs on, so the
# default needs no device.
CHANNELS_LAST = True


def resolve_device(device: str) -> torch.device:
    """auto -> cuda when available; under torchrun each process takes its LOCAL_RANK's GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"--device {device}: expected auto, cpu or cuda")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda but torch sees no CUDA device; use --device cpu or auto")
        if device == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return torch.device(device)


def default_amp(device: torch.device) -> bool:
    """bf16 autocast on CUDA; on the CPU only where it has native bf16 (AVX512-BF16 / AMX),
    where it measured 2.5x faster for a ResNet-18 step at 32 px (docs/train.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def enable_fast_kernels(device: torch.device) -> None:
    """On CUDA: autotuned convolutions (a training run's shapes repeat) and TF32 for the matmuls
    that run outside bf16 autocast. Nothing to set on the CPU."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")


def use_fast_attention(model: nn.Module, device: torch.device) -> None:
    """On the CPU, timm's attention blocks compute softmax(QK^T)V as plain matmuls instead of the
    fused kernel: the fused kernel's bf16 backward took half of a ViT-Tiny step (65 and 17 tokens),
    and the matmuls made the step 1.9x faster (fp32: 3% faster). CUDA keeps the fused kernel."""
    if device.type != "cpu":
        return
    for module in model.modules():
        if isinstance(getattr(module, "fused_attn", None), bool):
            module.fused_attn = False
