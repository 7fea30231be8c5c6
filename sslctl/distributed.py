"""torch.distributed primitives (docs/spec/methods.md §0.6). World size 1 never calls a collective.

Process groups are started by `init_from_env()` from torchrun's (or SLURM's) environment: nccl
on CUDA, gloo on the CPU. Everything else here works with or without a process group.
`convert_sync_batchnorm` gives BN statistics over the global batch on either backend.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group torchrun (or srun) described in the environment, if any.

    Returns True when running distributed. SLURM's SLURM_PROCID/SLURM_NTASKS are mapped to
    RANK/WORLD_SIZE when torchrun's variables are absent (srun without torchrun)."""
    if is_dist():
        return True
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if int(env.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(env.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' tensors concatenated in rank order along dim 0, without gradient (MoCo/AdCo keys)."""
    if world_size() == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    """Forward: all_gather. Backward: all-reduce(SUM) the gradient, return this rank's slice."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        n = grad.shape[0] // world_size()
        return grad[rank() * n : (rank() + 1) * n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' tensors in rank order, with gradient flowing back to each rank's own slice
    (SimCLR's in-batch negatives). With DDP's gradient averaging this optimises the mean of
    the per-rank losses."""
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """In-place SUM over ranks (Sinkhorn's sums); identity at world size 1."""
    if world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """In-place MAX over ranks (a shift shared by every rank, e.g. Sinkhorn's exp); identity at world size 1."""
    if world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks (AdCo's bank gradient); identity at world size 1."""
    if world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= world_size()
    return x


def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In place from rank `src` (identical random init of banks/queues on every rank)."""
    if world_size() > 1:
        dist.broadcast(x, src)
    return x


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


class _AllReduceSum(torch.autograd.Function):
    """SUM over ranks; the backward is a SUM of the gradients too (every rank's loss depends on
    every rank's contribution)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """SyncBatchNorm for processes on the CPU (gloo), where torch's has no kernel (and DDP refuses
    nn.SyncBatchNorm on CPU modules): training statistics over the global batch by differentiable
    all-reduces of the per-channel sums (two passes, mean then variance, for accuracy). The
    parameters, buffers and state_dict keys are BatchNorm's; evaluation, and a world of one, are
    plain BN. Any input of 2 or more dimensions (N x C x ...)."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an N x C (x ...) input, got {x.dim()} dimensions")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        count = x.numel() // x.shape[1]
        sums = _AllReduceSum.apply(torch.cat([xf.sum(dims), xf.new_tensor([count])]))
        n = sums[-1]
        mean = sums[:-1] / n
        var = _AllReduceSum.apply(((xf - mean.view(shape)) ** 2).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                self.running_var.lerp_((var.detach() * n / (n - 1)).to(self.running_var.dtype), factor)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm*d of `module` computes training statistics over all ranks' samples:
    nn.SyncBatchNorm under nccl, GlooSyncBatchNorm under gloo; unchanged at world size 1.
    Parameters are kept (same objects)."""
    if world_size() == 1:
        return module
    if dist.get_backend() == "nccl":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for m in module.modules():
        if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
            m.__class__ = GlooSyncBatchNorm  # same state, global statistics
    return module


class _StepModule(nn.Module):
    """What DDP wraps: the Method, with forward = training_step. Methods call their submodules
    directly, so wrapping the backbone alone would miss the heads; wrapping the whole Method and
    dispatching through forward lets DDP see one forward per step and all-reduce every
    trainable parameter's gradient."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.method.training_step(views)


def data_parallel(method: nn.Module, device: torch.device, compile: bool | str = False):
    """The callable that runs `method.training_step`: DDP over the whole Method when distributed.
    compile: torch.compile each child module in place (nn.Module.compile, so state_dict keys and
    the encoder export are unchanged), with Inductor (True) or the named backend."""
    if compile:
        for child in method.children():
            child.compile(backend=compile if isinstance(compile, str) else "inductor")
    if world_size() == 1:
        return method.training_step
    from torch.nn.parallel import DistributedDataParallel as DDP

    # Buffers (queues, banks, BN statistics) are synced once at construction and then kept
    # identical by the methods themselves; DDP's per-step buffer broadcast would copy a
    # 65536-column queue every step.
    return DDP(_StepModule(method), device_ids=[device.index] if device.type == "cuda" else None,
               forward_sync_buffers=False)
