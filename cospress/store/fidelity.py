"""A token codec's error where it matters for the loss: token-token cosines and the local KL.

For views whose float tokens (the reference) and decoded tokens are both known:

- ``cos_abs_err_mean`` / ``cos_abs_err_max``: mean and max of ``|cos(decoded) - cos(reference)|``
  over the token-token cosine matrices of every view (diagonal excluded);
- ``local_kl``: the local similarity KL at tau = 0.01 (`cospress.losses.similarity_kl`) of the
  decoded set against the reference set, ``KL(P_reference || P_decoded)``: what the codec alone adds;
- ``local_kl_rel_change``: ``|KL(P_dec || Q_z) - KL(P_ref || Q_z)| / KL(P_ref || Q_z)``, the
  relative change of the local term when the targets are decoded instead of the reference, with
  ``z`` the reference through a seeded random linear map to Dt / 2 dims (a compressor at its start).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cospress.command_config import InspectConfig

TAU = 0.01


def token_cosine_error(reference: np.ndarray, decoded: np.ndarray) -> dict[str, float]:
    """Mean and max ``|cos(decoded) - cos(reference)|`` over views ``[m, T, D]`` (off-diagonal)."""
    import torch

    from cospress.similarity import cosine_matrix

    ref = torch.from_numpy(np.asarray(reference, np.float32).reshape(-1, *reference.shape[-2:]))
    dec = torch.from_numpy(np.asarray(decoded, np.float32).reshape(ref.shape))
    err = (cosine_matrix(dec) - cosine_matrix(ref)).abs()
    n = err.shape[-1]
    off = ~torch.eye(n, dtype=torch.bool)
    vals = err[:, off]
    return {"mean": float(vals.mean()), "max": float(vals.max()) if vals.numel() else 0.0}


def local_kl(reference: np.ndarray, decoded: np.ndarray, seed: int = 0) -> dict[str, float]:
    """``local_kl`` and ``local_kl_rel_change`` (see the module docstring) of views ``[m, N, D]``."""
    import torch

    from cospress.losses import similarity_kls

    ref = torch.from_numpy(np.asarray(reference, np.float32))
    dec = torch.from_numpy(np.asarray(decoded, np.float32).reshape(ref.shape))
    gen = torch.Generator().manual_seed(seed)
    dim = ref.shape[-1]
    w = torch.randn(dim, max(dim // 2, 1), generator=gen) / dim**0.5
    z = ref @ w
    temps = (TAU,)
    with torch.no_grad():  # (ref, z), (dec, z), (ref, dec): each side's log P computed once
        base, other, own = (float(x) for x in similarity_kls([ref, z, dec], [(0, 1), (2, 1), (0, 2)], temps))
    return {"local_kl": own, "local_kl_rel_change": abs(other - base) / base if base > 0 else 0.0}


def codec_fidelity(
    reference: np.ndarray, decoded: np.ndarray, cls: np.ndarray | None = None
) -> dict[str, Any]:
    """Every measure above for views: tokens ``reference`` / ``decoded`` ``[m, T, D]`` and, for the
    local KL (over CLS + patches, as the local term), their CLS ``[m, D]`` when given."""
    cos = token_cosine_error(reference, decoded)
    ref, dec = np.asarray(reference, np.float32), np.asarray(decoded, np.float32)
    if cls is not None:
        c = np.asarray(cls, np.float32)[:, None, :]
        ref, dec = np.concatenate([c, ref], axis=1), np.concatenate([c, dec], axis=1)
    out = {"cos_abs_err_mean": cos["mean"], "cos_abs_err_max": cos["max"], **local_kl(ref, dec)}
    return {"views": int(ref.shape[0]), **{k: _round(v) for k, v in out.items()}}


def _round(x: float) -> float:
    return float(f"{x:.4g}")


def combine(parts: list[dict]) -> dict[str, Any] | None:
    """One summary of several `codec_fidelity` results (view-weighted means, the largest max)."""
    parts = [p for p in parts if p and p.get("views")]
    if not parts:
        return None
    n = sum(p["views"] for p in parts)

    def mean(key: str) -> float:
        return float(sum(p[key] * p["views"] for p in parts) / n)

    return {
        "views": n,
        "cos_abs_err_mean": _round(mean("cos_abs_err_mean")),
        "cos_abs_err_max": float(max(p["cos_abs_err_max"] for p in parts)),
        "local_kl": _round(mean("local_kl")),
        "local_kl_rel_change": _round(mean("local_kl_rel_change")),
    }


def sample_views(valid: np.ndarray, views: int, count: int) -> list[tuple[int, int]]:
    """Up to ``count`` (row, view) pairs of a shard's valid rows, evenly spread, deterministic."""
    rows = np.flatnonzero(np.asarray(valid))
    if not rows.size:
        return []
    pick = rows[np.linspace(0, rows.size - 1, min(count, rows.size)).round().astype(int)]
    return [(int(r), int(r) % views) for r in np.unique(pick)]


def measure_against(store: Any, reference: Any, rows: int = InspectConfig.rows) -> dict[str, Any]:
    """`codec_fidelity` of ``store``'s decoded tokens against ``reference``'s (two `StoreReader` of
    the same run, e.g. an int8 store and the fp16 store of the same teacher, views and keys), on up
    to ``rows`` valid rows spread over the store (one view each, as in `sample_views`)."""
    from cospress.errors import StoreError

    if not (store.has_tokens and reference.has_tokens):
        raise StoreError("fidelity --reference needs two stores that keep tokens")
    ref_rows = {k: i for i, k in enumerate(reference.keys())}
    keys = store.keys()
    pairs = [(r, v) for r, v in sample_views(store.valid(), store.stored_views, rows) if keys[r] in ref_rows]
    if not pairs or reference.dim != store.dim or reference.num_tokens != store.num_tokens:
        raise StoreError(
            f"{reference.display} shares no rows (or not the token shape) with {store.display}: "
            "use a reference store of the same teacher, source and views"
        )
    r, v = (np.array(x) for x in zip(*pairs, strict=True))
    got = store.read_rows(r, views=v[:, None])
    want = reference.read_rows([ref_rows[keys[i]] for i in r], views=v[:, None])
    if not np.array_equal(got["views"], want["views"]):
        raise StoreError(f"{reference.display} holds other views of these rows: not the same run's store")
    return codec_fidelity(want["tokens"][:, 0].astype(np.float32), got["tokens"][:, 0], want["cls"][:, 0])


__all__ = [
    "TAU", "codec_fidelity", "combine", "local_kl", "measure_against", "sample_views", "token_cosine_error",
]  # fmt: skip
