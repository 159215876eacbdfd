"""The shared ground of the similarity KL implementations: input checks and full-fp32 cosine matrices."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from cospress.errors import ConfigError

_EPS = 1e-12


def check_similarity_inputs(t: torch.Tensor, z: torch.Tensor, temperatures: Sequence[float]) -> None:
    """Raise ValueError / ConfigError when t [B, N, Dt], z [B, N, Ds] or the temperatures are unusable."""
    if t.dim() != 3 or z.dim() != 3:
        raise ValueError(
            f"similarity_kl needs t [B, N, Dt] and z [B, N, Ds]; got {tuple(t.shape)} and {tuple(z.shape)}"
        )
    if t.shape[:2] != z.shape[:2]:
        raise ValueError(
            f"similarity_kl needs the same sets and set size on both sides; got t {tuple(t.shape)} "
            f"and z {tuple(z.shape)}"
        )
    if t.shape[1] < 2:
        raise ValueError(
            f"similarity_kl needs at least 2 vectors per set (got N={t.shape[1]}, shape {tuple(t.shape)}); "
            "use a larger batch for the global term"
        )
    temps = list(temperatures)
    if not temps or any(not math.isfinite(float(x)) or float(x) <= 0 for x in temps):
        raise ConfigError(f"temperatures must be a non-empty list of positive numbers, got {temps}")


@contextlib.contextmanager
def full_fp32_matmul() -> Iterator[None]:
    """Float32 matmuls in full IEEE precision (no TF32, no bf16) inside; the settings are restored after.

    Overrides torch.set_float32_matmul_precision("high" / "medium") and
    torch.backends.cuda.matmul.allow_tf32 = True for the cuBLAS and oneDNN matmul backends.
    """
    backends = [
        b for b in (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul) if hasattr(b, "fp32_precision")
    ]
    saved = [b.fp32_precision for b in backends]
    try:
        for b in backends:
            b.fp32_precision = "ieee"
        yield
    finally:
        for b, value in zip(backends, saved, strict=True):
            b.fp32_precision = value


def cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    """Cosine similarities within each set, in full float32: x [B, N, D] -> [B, N, N].

    Always full fp32 (:func:`full_fp32_matmul`), whatever torch's float32 matmul precision setting:
    at tau = 0.01 a TF32 rounding of the cosine moves a logit by ~0.1.
    """
    xn = F.normalize(x.float(), dim=-1, eps=_EPS)
    with full_fp32_matmul():
        return xn @ xn.transpose(1, 2)
