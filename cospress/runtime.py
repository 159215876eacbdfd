"""The runtime every stage shares: device, precision, torchrun, seeds, the allocator.

One process per device under torchrun: gloo on CPU, nccl on CUDA. Without ``WORLD_SIZE > 1`` in the
environment nothing is initialised and every helper degrades to the single-process case.
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import logging
import os
import random
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from cospress.errors import ConfigError
from cospress.precision import DTYPE_NAMES, PRECISIONS

log = logging.getLogger(__name__)


_MALLOC_TUNED = False


def tune_malloc() -> bool:
    """Make glibc keep freed memory for reuse instead of returning big blocks to the OS at once.

    By default glibc serves every allocation over ~128 KB-32 MB with a fresh ``mmap`` and unmaps it
    on free, so each large activation tensor of a CPU forward pass is page-faulted (zeroed by the
    kernel) again: measured here, a batch of 256 views through efficientnet_lite0 at 112 px spent
    45% of its time in the kernel, and raising the mmap and trim thresholds made it 2x faster
    (5.1 s -> 2.5 s for 2,048 views). Trimming is switched off, not just raised: a distill step
    against ViT-S/14-shaped targets allocates ~9 GB (the local term's 256 x 256 similarities), and
    with a 2 GiB trim threshold glibc handed ~7 GB back after every step and page-faulted it in
    again on the next: 24-42 views/s, erratic, against a steady 56-62 with no trimming (measured
    side by side on 2 cores). The cost: the process keeps its peak heap until it exits.

    Called by every stage entry point; a no-op off glibc, on a second call, or when the
    environment sets COSPRESS_MALLOC_TUNING=0. Returns whether the thresholds were set.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED or os.environ.get("COSPRESS_MALLOC_TUNING", "1") == "0":
        return _MALLOC_TUNED
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
        ok = (
            libc.mallopt(m_mmap_threshold, 1 << 30) == 1
            and libc.mallopt(m_trim_threshold, -1) == 1  # glibc stores it as size_t: SIZE_MAX, never trim
        )
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False
    _MALLOC_TUNED = bool(ok)
    if ok:
        log.debug("glibc malloc: mmap threshold 1 GiB, no trimming (COSPRESS_MALLOC_TUNING=0 turns this off)")
    return _MALLOC_TUNED


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


# CPU flags of native bf16 matrix instructions: AMX tiles (Sapphire Rapids and later) or AVX-512 BF16
# (Cooper Lake, Zen 4 and later). Measured on 2 cores of a Zen 4 EPYC with avx512_bf16 and no AMX:
# bf16 autocast made a ViT-Ti/16 @64 train step 1.7x faster and efficientnet_lite0 @112 inference
# 2.2-3.1x faster than fp32.
_FAST_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def cpu_has_fast_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU has native bf16 matrix instructions (AMX or AVX-512 BF16)."""
    return bool(_FAST_BF16_FLAGS & (cpu_flags() if flags is None else flags))


# OpenBLAS kernel families by the CPU flags they need, best first (names as OPENBLAS_CORETYPE takes them).
_OPENBLAS_CORES = (
    ("SkylakeX", frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"})),
    ("Haswell", frozenset({"avx2", "fma"})),
)


def openblas_coretype(flags: frozenset[str]) -> str | None:
    """The OpenBLAS kernel family for a CPU with these flags, or None to let OpenBLAS decide."""
    return next((core for core, need in _OPENBLAS_CORES if need <= flags), None)


def import_faiss() -> Any:
    """Import faiss with its bundled OpenBLAS set to the kernels this CPU supports.

    faiss-cpu wheels ship their own OpenBLAS (0.3.15 in faiss-cpu 1.15.1), which falls back to a slow
    generic kernel on CPUs it does not know (recent or virtualised ones, with a generic model name):
    measured on an AVX-512 Xeon, a 10k x 100k x 384 search took 18.4 s by default and 4.1 s with
    SkylakeX; on an AVX2 EPYC 25.0 s and 9.5 s with Haswell. OpenBLAS reads OPENBLAS_CORETYPE when the
    library loads, so it is set only around ``import faiss`` and restored after: numpy's and torch's
    BLAS are loaded before and keep detecting the CPU themselves. A value the user set always wins;
    COSPRESS_FAISS_CORETYPE=0 leaves OpenBLAS to its own detection.
    """
    import numpy  # noqa: F401  loaded first: its own OpenBLAS must not see the variable

    chosen = os.environ.get("OPENBLAS_CORETYPE") or os.environ.get("COSPRESS_FAISS_CORETYPE") == "0"
    core = None if chosen else openblas_coretype(cpu_flags())
    if core is None or "faiss" in sys.modules:
        import faiss

        return faiss
    os.environ["OPENBLAS_CORETYPE"] = core
    try:
        import faiss
    finally:
        del os.environ["OPENBLAS_CORETYPE"]
    log.debug("faiss imported with OPENBLAS_CORETYPE=%s for its bundled OpenBLAS", core)
    return faiss


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` (one of `precision.PRECISIONS`); None means no autocast.

    auto = bf16 on CUDA and on CPUs with native bf16 instructions (AMX or AVX-512 BF16, where it is
    1.7-3x faster for ViTs and CNNs), else fp32.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is unknown; use one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16()):
        return torch.bfloat16
    return None


def dtype_name(dtype: torch.dtype | None) -> str:
    """The one name of a compute dtype (None = no autocast = float32), as stores and caches record it."""
    return (
        DTYPE_NAMES["fp32"]
        if dtype is None
        else DTYPE_NAMES["bf16"]
        if dtype == torch.bfloat16
        else str(dtype)
    )


def to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small host tensor on ``device`` (as ``dtype``): on CUDA through pinned memory without blocking (a
    pageable ``.to(device)`` or ``torch.tensor(..., device=)`` is a copy plus a wait for the stream);
    elsewhere ``t.to(device, dtype)``, the same values."""
    t = t if dtype is None else t.to(dtype)
    if torch.device(device).type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def dist_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) otherwise."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    return rank, world, local


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


DIST_TIMEOUT_ENV = "COSPRESS_DIST_TIMEOUT"  # seconds a rank waits for the others (default 1800)


def _attempt_store(world: int, timeout: datetime.timedelta) -> Any:
    """Under torchrun's agent store (the c10d rendezvous), the store of this attempt of the worker group:
    the agent's store under a prefix per restart; None otherwise (init_process_group's own ``env://``).

    The agent keeps one store for the whole job, so without a prefix a restarted group reads the keys
    its dead predecessor wrote: gloo connected to a killed rank's old address ("Connection refused",
    or a wait in connectFullMesh until the timeout, attempt after attempt), as NCCL would read an old
    unique id."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_PORT" not in os.environ:
        return None
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=timeout
    )
    return dist.PrefixStore(f"cospress/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def init_distributed(device: str = "auto", timeout_s: float | None = None) -> DistContext:
    """Initialise the default process group when torchrun started several processes.

    The backend is nccl when the device is CUDA, gloo otherwise. Each CUDA rank takes device
    ``cuda:LOCAL_RANK``. Calling it twice is harmless. ``timeout_s`` (default ``$COSPRESS_DIST_TIMEOUT``
    or 1800): how long a rank waits for the others in the set-up and in every collective; past it the
    rank fails, so `torchrun --max-restarts N` restarts the group instead of waiting on a lost peer.
    """
    if timeout_s is None:
        raw = os.environ.get(DIST_TIMEOUT_ENV) or "1800"
        try:
            timeout_s = float(raw)
        except ValueError:
            raise ConfigError(f"{DIST_TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    rank, world, local = dist_info()
    dev = pick_device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        # gloo's connect can wait past the timeout (both ranks in connectFullMesh, as with the stale
        # keys `_attempt_store` avoids): a rank that has not joined by then prints its stack and exits
        # 1, so torchrun restarts the group rather than waiting forever
        faulthandler.dump_traceback_later(timeout_s, exit=True)
        timeout = datetime.timedelta(seconds=timeout_s)
        try:
            dist.init_process_group(
                backend=backend,
                rank=rank,
                world_size=world,
                timeout=timeout,
                store=_attempt_store(world, timeout),
            )
        finally:
            faulthandler.cancel_dump_traceback_later()
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
