"""torch.distributed primitives (METHODS.md §0.6). World size 1 never calls a collective.

Process groups are started by `init_from_env()` from torchrun's (or SLURM's) environment: nccl
on CUDA, gloo on the CPU. Everything else here works with or without a process group.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


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
