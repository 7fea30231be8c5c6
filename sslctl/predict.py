"""A frozen model over batches of images: `sslctl embed` (embed.embed_shards), the evaluation of
`sslctl finetune` / `distill` and the training's online monitor all run it."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch
from torch import nn


def predict(
    forward: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple],
    *,
    device: torch.device,
    bf16: bool = False,
    channels_last: bool = False,
) -> Iterator[tuple]:
    """For each (images, *rest) of `batches`: (forward(images) as float32 on the CPU, *rest),
    under inference mode and (bf16) autocast, the images on `device` in the model's memory format.
    An empty batch gives empty outputs without calling `forward`. The model's train/eval mode is
    the caller's (`predict_split` sets eval)."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for images, *rest in batches:
        if not len(images):
            yield torch.empty(0), *rest
            continue
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            x = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            out = forward(x).float().cpu()
        yield out, *rest


def predict_split(model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], loader: Iterable[tuple],
                  **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs N x ..., labels N) of `forward` (a function of `model`: its embed or logits) over a
    loader of (images, labels) in its order, `model` in eval mode meanwhile; kwargs as `predict`."""
    was_training = model.training
    model.eval()
    try:
        outputs, labels = zip(*predict(forward, loader, **kwargs))
    finally:
        model.train(was_training)
    return torch.cat(outputs), torch.cat(labels)
