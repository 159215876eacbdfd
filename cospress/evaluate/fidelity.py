"""How well a student keeps its teacher's geometry, measured on the same images.

All functions take student features S [N, Ds] and teacher features T [N, Dt] for the same N
images in the same order (the dimensions may differ).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from cospress.evaluate.knn import l2_normalize


def pair_indices(n: int, max_pairs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j), i < j: the whole upper triangle, or max_pairs random pairs (seeded)."""
    total = n * (n - 1) // 2
    if total <= max_pairs:
        return np.triu_indices(n, k=1)
    # pairs drawn uniformly with replacement (duplicates are harmless for correlations)
    rng = np.random.default_rng(seed)
    a = rng.integers(0, n, size=2 * max_pairs)
    b = rng.integers(0, n, size=2 * max_pairs)
    keep = np.flatnonzero(a != b)[:max_pairs]
    i, j = np.minimum(a[keep], b[keep]), np.maximum(a[keep], b[keep])
    return i, j


def pairwise_cosines(x: np.ndarray, i: np.ndarray, j: np.ndarray, budget: int = 32 << 20) -> np.ndarray:
    """Cosine similarity of the pairs (i[p], j[p]) of rows of x [N, D] -> [P], gathering at most
    ``budget`` bytes of rows per side at a time (2 M pairs of 1,280-d rows gathered at once: 20 GB)."""
    x = l2_normalize(x)
    out = np.empty(len(i), dtype=np.float64)
    chunk = max(1, budget // max(1, x.shape[1] * x.itemsize))
    for s in range(0, len(i), chunk):
        out[s : s + chunk] = np.einsum("pd,pd->p", x[i[s : s + chunk]], x[j[s : s + chunk]])
    return out


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of the ranks (ties get their average rank)."""
    return pearson(rankdata(a), rankdata(b))


def knn_sets(x: np.ndarray, k: int, chunk: int = 2048) -> np.ndarray:
    """The k nearest other rows of every row of x [N, D] by cosine -> [N, k] indices (self excluded)."""
    x = l2_normalize(x)
    n = len(x)
    k = min(k, n - 1)
    out = np.empty((n, k), dtype=np.int64)
    for s in range(0, n, chunk):
        sims = x[s : s + chunk] @ x.T
        sims[np.arange(len(sims)), np.arange(s, s + len(sims))] = -np.inf
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        out[s : s + chunk] = part
    return out


def knn_overlap(s: np.ndarray, t: np.ndarray, k: int = 10) -> float:
    """Mean over images of |kNN_student(i) ∩ kNN_teacher(i)| / k."""
    a, b = knn_sets(s, k), knn_sets(t, k)
    k = a.shape[1]
    inter = [len(np.intersect1d(a[r], b[r], assume_unique=True)) for r in range(len(a))]
    return float(np.mean(inter) / k)


def linear_cka(s: np.ndarray, t: np.ndarray) -> float:
    """Linear centred kernel alignment ||T_c^T S_c||_F^2 / (||S_c^T S_c||_F ||T_c^T T_c||_F)."""
    s = np.asarray(s, np.float64)
    t = np.asarray(t, np.float64)
    s = s - s.mean(axis=0)
    t = t - t.mean(axis=0)
    cross = np.linalg.norm(t.T @ s) ** 2
    denom = np.linalg.norm(s.T @ s) * np.linalg.norm(t.T @ t)
    return float(cross / denom) if denom > 0 else 0.0


def fidelity_metrics(
    s: np.ndarray, t: np.ndarray, k: int = 10, max_pairs: int = 2_000_000, seed: int = 0
) -> dict[str, float]:
    """{spearman, pearson} of pairwise cosines, knn10_overlap (k nearest neighbours) and linear cka."""
    if len(s) != len(t):
        raise ValueError(f"student and teacher features differ in rows: {len(s)} vs {len(t)}")
    i, j = pair_indices(len(s), max_pairs, seed)
    cs, ct = pairwise_cosines(s, i, j), pairwise_cosines(t, i, j)
    return {
        "spearman": spearman(cs, ct),
        "pearson": pearson(cs, ct),
        f"knn{k}_overlap": knn_overlap(s, t, k),
        "cka": linear_cka(s, t),
        "num_images": int(len(s)),
        "num_pairs": int(len(i)),
    }


def similarity_sample(
    s: np.ndarray, t: np.ndarray, max_pairs: int = 50_000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(student cosines, teacher cosines) of a deterministic sample of pairs, for plots."""
    i, j = pair_indices(len(s), max_pairs, seed)
    return pairwise_cosines(s, i, j), pairwise_cosines(t, i, j)
