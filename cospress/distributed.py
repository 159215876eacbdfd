"""torch.distributed set-up from torchrun's environment, and an autograd-aware all-gather.

One process per device: gloo on CPU, nccl on CUDA. Without ``WORLD_SIZE > 1`` in the environment
nothing is initialised and every helper degrades to the single-process case.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cospress.utils import dist_info, pick_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: rank, world size, local rank and its device."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Initialise the default process group when torchrun started several processes.

    The backend is nccl when the device is CUDA, gloo otherwise. Each CUDA rank takes device
    ``cuda:LOCAL_RANK``. Calling it twice is harmless.
    """
    rank, world, local = dist_info()
    dev = pick_device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        log.info("initialised torch.distributed: backend=%s rank=%d world=%d", backend, rank, world)
    return DistContext(rank=rank, world=world, local_rank=local, device=dev)


def teardown_distributed() -> None:
    """Destroy the default process group if this module (or anyone) created one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's [b, ...] tensor along dim 0; gradients flow back to each slice.

    Every rank computes the same loss on the gathered batch, and DDP then averages parameter
    gradients over ranks. So the backward sums the incoming gradient over ranks (all_reduce) and
    returns this rank's slice: after DDP's mean the parameters see exactly the single-process gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world = dist.get_world_size()
        ctx.rank = dist.get_rank()
        ctx.sizes = _gather_sizes(x.shape[0])
        x = x.contiguous()
        max_b = max(ctx.sizes)
        padded = x if x.shape[0] == max_b else torch.cat([x, x.new_zeros((max_b - x.shape[0], *x.shape[1:]))])
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:n] for p, n in zip(parts, ctx.sizes, strict=True)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]]


def _gather_sizes(n: int) -> list[int]:
    world = dist.get_world_size()
    t = torch.tensor([n], dtype=torch.long)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    out = [torch.zeros_like(t) for _ in range(world)]
    dist.all_gather(out, t)
    return [int(o.item()) for o in out]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[b, ...] on each rank -> [sum of b, ...] in rank order, differentiable; identity when alone."""
    if world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """[b, ...] on each rank -> [sum of b, ...] in rank order, detached; identity when alone."""
    if world_size() == 1:
        return x.detach()
    with torch.no_grad():
        return _AllGatherWithGrad.apply(x.detach())


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (a detached copy); identity when alone."""
    if world_size() == 1:
        return x.detach()
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / world_size()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every rank's module (in place)."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=src)
