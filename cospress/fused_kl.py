"""Memory-lean and fused (Triton) similarity-preservation KL.

Both compute exactly what `cospress.losses.similarity_kl` computes (see there for the formula), but
neither stores a per-temperature N x N matrix for the backward pass: only the two cosine matrices
S_t, S_z [B, N, N] are kept, and the gradient is recomputed from them analytically.

Notation for one set and one temperature tau (i != j everywhere; a_ij = S_t[i, j] / tau):
    lp_ij = log_softmax_{j != i}(a)_ij            log p_{j|i}, row-wise log-softmax without the diagonal
    logP_ij = logaddexp(lp_ij, lp_ji) - log 2N    (same on S_z gives lq, logQ)
    D_ij = logP_ij - logQ_ij,   KL = sum_ij exp(logP_ij) D_ij
Gradients (derived by hand, checked against autograd in tests/test_fused_kl.py):
    dKL/dS_t[i, j] = p_ij (D_ij / N - Rt_i) / tau,   Rt_i = sum_k p_ik D_ik / N
    dKL/dS_z[i, j] = (G_ij - q_ij Rz_i) / tau,       G_ij = -exp(logP_ij + lq_ij - logQ_ij) / N,  Rz_i = sum_k G_ik

`lean` is pure PyTorch and loops over the temperatures. `fused` runs three Triton kernels (row
log-sum-exps; KL and the row sums Rt, Rz; the gradient) that each read a tile of S_t and S_z once
and loop over all temperatures on chip. On a CPU the Triton kernels run under `TRITON_INTERPRET=1`
(slow; for tests only; it must be set before triton is first imported in the process).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from cospress.similarity import check_similarity_inputs, cosine_matrix

log = logging.getLogger(__name__)

# Bound on first use by _kernels(); the Triton kernels look these names up as module globals.
triton: Any = None
tl: Any = None


@functools.lru_cache(maxsize=16)
def _temps_on(temps: tuple[float, ...], device: torch.device) -> torch.Tensor:
    # A normal tensor even when first built under torch.inference_mode(): it is cached and saved for
    # backward by later training calls, which refuse inference tensors.
    with torch.inference_mode(False):
        return torch.tensor(temps, dtype=torch.float32, device=device)


def _temps_tensor(temperatures: Sequence[float], device: torch.device) -> torch.Tensor:
    """[T] float32 on `device`, cached so that a training loop does not copy it to the GPU every step."""
    return _temps_on(tuple(float(x) for x in temperatures), device)


def _prepare(t: torch.Tensor, z: torch.Tensor, temperatures: Sequence[float]):
    check_similarity_inputs(t, z, temperatures)
    with torch.autocast(device_type=t.device.type, enabled=False):
        return cosine_matrix(t), cosine_matrix(z)


# ---------------------------------------------------------------------------------------------- lean


def _lean_terms(st: torch.Tensor, sz: torch.Tensor, tau: float, eye: torch.Tensor):
    """One temperature: (lp, lq, logP, logQ) [B, N, N], finite everywhere (diagonal set to 0)."""
    n = st.shape[-1]
    log2n = math.log(2 * n)
    out = []
    for s in (st, sz):
        a = (s / tau).masked_fill(eye, float("-inf"))
        lp = torch.log_softmax(a, dim=-1).masked_fill(eye, 0.0)
        out.append(lp)
    lp, lq = out
    logp_joint = torch.logaddexp(lp, lp.transpose(1, 2)) - log2n
    logq_joint = torch.logaddexp(lq, lq.transpose(1, 2)) - log2n
    return lp, lq, logp_joint, logq_joint


class _LeanKL(torch.autograd.Function):
    """Per-set KL summed over temperatures is never stored per temperature; backward recomputes."""

    @staticmethod
    def forward(ctx: Any, st: torch.Tensor, sz: torch.Tensor, temps: tuple[float, ...]) -> torch.Tensor:
        b, n, _ = st.shape
        eye = torch.eye(n, dtype=torch.bool, device=st.device)
        total = st.new_zeros(())
        for tau in temps:
            _, _, lpj, lqj = _lean_terms(st, sz, tau, eye)
            kl = (lpj.exp() * (lpj - lqj)).masked_fill(eye, 0.0)
            total = total + kl.sum()
        ctx.save_for_backward(st, sz)
        ctx.temps = temps
        return total / (b * len(temps))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor):
        st, sz = ctx.saved_tensors
        b, n, _ = st.shape
        eye = torch.eye(n, dtype=torch.bool, device=st.device)
        need_t, need_z = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gt = torch.zeros_like(st) if need_t else None
        gz = torch.zeros_like(sz) if need_z else None
        for tau in ctx.temps:
            lp, lq, lpj, lqj = _lean_terms(st, sz, tau, eye)
            d = lpj - lqj
            if need_t:
                p = lp.exp().masked_fill(eye, 0.0)
                rt = (p * d).sum(-1, keepdim=True) / n
                gt += p * (d / n - rt) / tau
            if need_z:
                g = -(lpj + lq - lqj).exp().masked_fill(eye, 0.0) / n
                q = lq.exp().masked_fill(eye, 0.0)
                gz += (g - q * g.sum(-1, keepdim=True)) / tau
        scale = grad_out / (b * len(ctx.temps))
        return (gt * scale if need_t else None), (gz * scale if need_z else None), None


def similarity_kl_lean(t: torch.Tensor, z: torch.Tensor, temperatures: Sequence[float]) -> torch.Tensor:
    """`similarity_kl` in pure PyTorch, storing only S_t and S_z [B, N, N] for backward.

    t: [B, N, Dt], z: [B, N, Ds] -> scalar (mean over sets and temperatures of KL(P || Q)).
    """
    st, sz = _prepare(t, z, temperatures)
    with torch.autocast(device_type=t.device.type, enabled=False):
        return _LeanKL.apply(st, sz, tuple(float(x) for x in temperatures))


# ---------------------------------------------------------------------------------------------- fused


@functools.cache
def triton_available() -> bool:
    """True when the `triton` package can be imported (it need not have a GPU to run on)."""
    return importlib.util.find_spec("triton") is not None


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@functools.cache
def _kernels(interpret: bool) -> dict[str, Any]:
    """Define the Triton kernels on first use (the decorator reads TRITON_INTERPRET when it runs)."""
    global triton, tl
    import triton
    import triton.language as tl

    @triton.jit
    def row_lse_kernel(
        s_ptr, temps_ptr, m_ptr, ls_ptr, N, T, BI: tl.constexpr, BJ: tl.constexpr, TP: tl.constexpr
    ):  # fmt: skip
        # m[b, i] = max_{j != i} S[b, i, j]; ls[b, k, i] = log sum_{j != i} exp((S[b, i, j] - m[b, i]) / tau_k),
        # all k in one pass over the row. lp_ij = (S_ij - m_i) / tau - ls_i keeps the large terms apart.
        pid_i = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        rows = pid_i * BI + tl.arange(0, BI)
        row_ok = rows < N
        base = s_ptr + b * N * N
        m = tl.full((BI,), float("-inf"), tl.float32)
        for j0 in range(0, N, BJ):
            cols = j0 + tl.arange(0, BJ)
            ok = row_ok[:, None] & (cols[None, :] < N) & (rows[:, None] != cols[None, :])
            s = tl.load(base + rows[:, None] * N + cols[None, :], mask=ok, other=0.0)
            m = tl.maximum(m, tl.max(tl.where(ok, s, float("-inf")), axis=1))
        kcols = tl.arange(0, TP)
        acc = tl.zeros((BI, TP), tl.float32)
        for j0 in range(0, N, BJ):
            cols = j0 + tl.arange(0, BJ)
            ok = row_ok[:, None] & (cols[None, :] < N) & (rows[:, None] != cols[None, :])
            s = tl.load(base + rows[:, None] * N + cols[None, :], mask=ok, other=0.0)
            diff = tl.where(ok, s - m[:, None], float("-inf"))
            for k in range(T):
                inv = 1.0 / tl.load(temps_ptr + k)
                e = tl.sum(tl.exp(diff * inv), axis=1)
                acc = tl.where(kcols[None, :] == k, acc + e[:, None], acc)
        out_ok = row_ok[:, None] & (kcols[None, :] < T)
        tl.store(
            ls_ptr + b * T * N + kcols[None, :] * N + rows[:, None],
            tl.log(tl.where(out_ok, acc, 1.0)),
            mask=out_ok,
        )
        tl.store(m_ptr + b * N + rows, m, mask=row_ok)

    @triton.jit
    def kl_fwd_kernel(
        st_ptr, sz_ptr, temps_ptr, mt_ptr, mz_ptr, lt_ptr, lz_ptr, kl_ptr, rt_ptr, rz_ptr, N, T, log2n,
        BI: tl.constexpr, BJ: tl.constexpr, TP: tl.constexpr,
    ):  # fmt: skip
        # Per row i and temperature k: kl = sum_j P D, Rt = sum_j p D / N, Rz = sum_j G.
        pid_i = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        rows = pid_i * BI + tl.arange(0, BI)
        row_ok = rows < N
        kcols = tl.arange(0, TP)
        acc_kl = tl.zeros((BI, TP), tl.float32)
        acc_rt = tl.zeros((BI, TP), tl.float32)
        acc_rz = tl.zeros((BI, TP), tl.float32)
        for j0 in range(0, N, BJ):
            cols = j0 + tl.arange(0, BJ)
            col_ok = cols < N
            ok = row_ok[:, None] & col_ok[None, :] & (rows[:, None] != cols[None, :])
            offs = b * N * N + rows[:, None] * N + cols[None, :]
            st = tl.load(st_ptr + offs, mask=ok, other=0.0)
            sz = tl.load(sz_ptr + offs, mask=ok, other=0.0)
            dti = st - tl.load(mt_ptr + b * N + rows, mask=row_ok, other=0.0)[:, None]
            dtj = st - tl.load(mt_ptr + b * N + cols, mask=col_ok, other=0.0)[None, :]
            dzi = sz - tl.load(mz_ptr + b * N + rows, mask=row_ok, other=0.0)[:, None]
            dzj = sz - tl.load(mz_ptr + b * N + cols, mask=col_ok, other=0.0)[None, :]
            for k in range(T):
                inv = 1.0 / tl.load(temps_ptr + k)
                lbase = b * T * N + k * N
                lti = tl.load(lt_ptr + lbase + rows, mask=row_ok, other=0.0)
                ltj = tl.load(lt_ptr + lbase + cols, mask=col_ok, other=0.0)
                lzi = tl.load(lz_ptr + lbase + rows, mask=row_ok, other=0.0)
                lzj = tl.load(lz_ptr + lbase + cols, mask=col_ok, other=0.0)
                lp = dti * inv - lti[:, None]
                lpt = dtj * inv - ltj[None, :]
                lpj = tl.maximum(lp, lpt) + tl.log(1.0 + tl.exp(-tl.abs(lp - lpt))) - log2n
                lq = dzi * inv - lzi[:, None]
                lqt = dzj * inv - lzj[None, :]
                lqj = tl.maximum(lq, lqt) + tl.log(1.0 + tl.exp(-tl.abs(lq - lqt))) - log2n
                d = lpj - lqj
                kl = tl.sum(tl.where(ok, tl.exp(lpj) * d, 0.0), axis=1)
                rt = tl.sum(tl.where(ok, tl.exp(lp) * d, 0.0), axis=1) / N
                rz = -tl.sum(tl.where(ok, tl.exp(lpj + lq - lqj), 0.0), axis=1) / N
                sel = kcols[None, :] == k
                acc_kl = tl.where(sel, acc_kl + kl[:, None], acc_kl)
                acc_rt = tl.where(sel, acc_rt + rt[:, None], acc_rt)
                acc_rz = tl.where(sel, acc_rz + rz[:, None], acc_rz)
        out = b * T * N + kcols[None, :] * N + rows[:, None]
        out_ok = row_ok[:, None] & (kcols[None, :] < T)
        tl.store(kl_ptr + out, acc_kl, mask=out_ok)
        tl.store(rt_ptr + out, acc_rt, mask=out_ok)
        tl.store(rz_ptr + out, acc_rz, mask=out_ok)

    @triton.jit
    def kl_bwd_kernel(
        st_ptr, sz_ptr, temps_ptr, mt_ptr, mz_ptr, lt_ptr, lz_ptr, rt_ptr, rz_ptr, gout_ptr, gt_ptr, gz_ptr,
        N, T, log2n, scale, NEED_T: tl.constexpr, NEED_Z: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr,
    ):  # fmt: skip
        # One tile of dKL/dS_t and dKL/dS_z, summed over the temperatures on chip.
        pid_i = tl.program_id(0)
        pid_j = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        rows = pid_i * BI + tl.arange(0, BI)
        cols = pid_j * BJ + tl.arange(0, BJ)
        row_ok = rows < N
        col_ok = cols < N
        ok = row_ok[:, None] & col_ok[None, :] & (rows[:, None] != cols[None, :])
        offs = b * N * N + rows[:, None] * N + cols[None, :]
        st = tl.load(st_ptr + offs, mask=ok, other=0.0)
        sz = tl.load(sz_ptr + offs, mask=ok, other=0.0)
        dti = st - tl.load(mt_ptr + b * N + rows, mask=row_ok, other=0.0)[:, None]
        dtj = st - tl.load(mt_ptr + b * N + cols, mask=col_ok, other=0.0)[None, :]
        dzi = sz - tl.load(mz_ptr + b * N + rows, mask=row_ok, other=0.0)[:, None]
        dzj = sz - tl.load(mz_ptr + b * N + cols, mask=col_ok, other=0.0)[None, :]
        gt = tl.zeros((BI, BJ), tl.float32)
        gz = tl.zeros((BI, BJ), tl.float32)
        for k in range(T):
            inv = 1.0 / tl.load(temps_ptr + k)
            lbase = b * T * N + k * N
            lti = tl.load(lt_ptr + lbase + rows, mask=row_ok, other=0.0)
            ltj = tl.load(lt_ptr + lbase + cols, mask=col_ok, other=0.0)
            lzi = tl.load(lz_ptr + lbase + rows, mask=row_ok, other=0.0)
            lzj = tl.load(lz_ptr + lbase + cols, mask=col_ok, other=0.0)
            lp = dti * inv - lti[:, None]
            lpt = dtj * inv - ltj[None, :]
            lpj = tl.maximum(lp, lpt) + tl.log(1.0 + tl.exp(-tl.abs(lp - lpt))) - log2n
            lq = dzi * inv - lzi[:, None]
            lqt = dzj * inv - lzj[None, :]
            lqj = tl.maximum(lq, lqt) + tl.log(1.0 + tl.exp(-tl.abs(lq - lqt))) - log2n
            d = lpj - lqj
            if NEED_T:
                rti = tl.load(rt_ptr + lbase + rows, mask=row_ok, other=0.0)
                gt += tl.where(ok, tl.exp(lp) * (d / N - rti[:, None]), 0.0) * inv
            if NEED_Z:
                rzi = tl.load(rz_ptr + lbase + rows, mask=row_ok, other=0.0)
                g = -tl.exp(lpj + lq - lqj) / N
                gz += tl.where(ok, g - tl.exp(lq) * rzi[:, None], 0.0) * inv
        w = tl.load(gout_ptr) * scale
        out_ok = row_ok[:, None] & col_ok[None, :]
        if NEED_T:
            tl.store(gt_ptr + offs, gt * w, mask=out_ok)
        if NEED_Z:
            tl.store(gz_ptr + offs, gz * w, mask=out_ok)

    return {"lse": row_lse_kernel, "fwd": kl_fwd_kernel, "bwd": kl_bwd_kernel}


# Tile of S handled by one program; 8 warps keep the ~10 live [BI, BJ] float tiles in registers.
_BI, _BJ, _WARPS = 32, 64, 8


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _launch_lse(k: dict[str, Any], s: torch.Tensor, temps: torch.Tensor, tp: int):
    """Row maxima m [B, N] and shifted log-sum-exps ls [B, T, N] of S [B, N, N] without its diagonal."""
    b, n, _ = s.shape
    m = torch.empty((b, n), dtype=torch.float32, device=s.device)
    ls = torch.empty((b, temps.numel(), n), dtype=torch.float32, device=s.device)
    k["lse"][(_cdiv(n, _BI), b)](s, temps, m, ls, n, temps.numel(), BI=_BI, BJ=_BJ, TP=tp)
    return m, ls


class _FusedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, st: torch.Tensor, sz: torch.Tensor, temps: torch.Tensor) -> torch.Tensor:
        k = _kernels(_interpret())
        st, sz = st.contiguous(), sz.contiguous()
        b, n, _ = st.shape
        nt = temps.numel()
        tp = max(2, 1 << (nt - 1).bit_length())
        mt, lt = _launch_lse(k, st, temps, tp)
        mz, lz = _launch_lse(k, sz, temps, tp)
        kl, rt, rz = (torch.empty((b, nt, n), dtype=torch.float32, device=st.device) for _ in range(3))
        log2n = math.log(2 * n)
        k["fwd"][(_cdiv(n, _BI), b)](
            st, sz, temps, mt, mz, lt, lz, kl, rt, rz, n, nt, log2n, BI=_BI, BJ=_BJ, TP=tp, num_warps=_WARPS
        )
        ctx.save_for_backward(st, sz, temps, mt, mz, lt, lz, rt, rz)
        return kl.sum() / (b * nt)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor):
        st, sz, temps, mt, mz, lt, lz, rt, rz = ctx.saved_tensors
        need_t, need_z = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        b, n, _ = st.shape
        nt = temps.numel()
        gt = torch.empty_like(st) if need_t else st.new_empty(1)
        gz = torch.empty_like(sz) if need_z else sz.new_empty(1)
        k = _kernels(_interpret())
        grid = (_cdiv(n, _BI), _cdiv(n, _BJ), b)
        k["bwd"][grid](
            st, sz, temps, mt, mz, lt, lz, rt, rz, grad_out.float().contiguous(), gt, gz,
            n, nt, math.log(2 * n), 1.0 / (b * nt), NEED_T=need_t, NEED_Z=need_z, BI=_BI, BJ=_BJ,
            num_warps=_WARPS,
        )  # fmt: skip
        return (gt if need_t else None), (gz if need_z else None), None


def similarity_kl_fused(t: torch.Tensor, z: torch.Tensor, temperatures: Sequence[float]) -> torch.Tensor:
    """`similarity_kl` with Triton kernels: all temperatures in one pass over each tile of S.

    t: [B, N, Dt], z: [B, N, Ds] -> scalar. Needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1).
    """
    if not triton_available():
        raise RuntimeError("the fused similarity KL needs triton (pip install triton); use impl='lean'")
    if t.device.type != "cuda" and not _interpret():
        raise ValueError(
            f"the fused similarity KL runs on CUDA tensors, got {t.device}; use impl='lean' or 'plain' "
            "(or set TRITON_INTERPRET=1 to test it on the CPU)"
        )
    st, sz = _prepare(t, z, temperatures)
    with torch.autocast(device_type=t.device.type, enabled=False):
        return _FusedKL.apply(st, sz, _temps_tensor(temperatures, t.device))
