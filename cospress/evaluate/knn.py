"""Weighted kNN classification over a FAISS inner-product index (DINO-style vote).

Features are L2-normalised float32, so inner product = cosine similarity. The bank is searched
once with the largest k; every smaller k reuses the first k columns of that search.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from cospress.errors import ConfigError
from cospress.runtime import import_faiss
from cospress.vote import vote

faiss = import_faiss()

log = logging.getLogger(__name__)

PROTOCOLS: dict[str, dict] = {
    # name: the k values scored, the temperature, and the k whose top-1 is the headline number
    "dino": {"ks": (10, 20, 100, 200), "temperature": 0.07, "main_k": 20},
    "cospress": {"ks": (10,), "temperature": 0.07, "main_k": 10},
}


@dataclass
class SearchResult:
    """Nearest neighbours of a set of queries, most similar first.

    sims: [Q, k] float32 cosine similarities; idx: [Q, k] int64 bank rows.
    """

    sims: np.ndarray
    idx: np.ndarray


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation of [N, D] features, as contiguous float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, eps))


def build_index(
    bank: np.ndarray,
    kind: str = "flat",
    nlist: int | None = None,
    nprobe: int = 16,
    use_gpu: bool | None = None,
    seed: int = 0,
) -> faiss.Index:
    """A FAISS inner-product index over the bank [N, D] (normalised float32).

    kind: "flat" (exact) or "ivf" (IndexIVFFlat, nlist cells, nprobe of them searched; for large
    banks). use_gpu: None = use a GPU when FAISS sees one.
    """
    bank = np.ascontiguousarray(bank, dtype=np.float32)
    n, d = bank.shape
    if n == 0:
        raise ConfigError("the kNN bank is empty; give a --train source with labelled images")
    if kind == "flat":
        index: faiss.Index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = nlist or max(1, min(int(4 * np.sqrt(n)), n // 39 or 1))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(bank)
        index.nprobe = min(nprobe, nlist)
        log.info("IVF index: nlist=%d nprobe=%d", nlist, index.nprobe)
    else:
        raise ConfigError(f"unknown index kind {kind!r}; use flat or ivf")
    if use_gpu is None:
        use_gpu = faiss.get_num_gpus() > 0 and hasattr(faiss, "StandardGpuResources")
    if use_gpu:
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, 0, index)
        index._cospress_resources = resources  # keep the resources alive with the index
        log.info("FAISS index on GPU")
    index.add(bank)
    return index


def search(index: faiss.Index, queries: np.ndarray, k: int, chunk: int = 8192) -> SearchResult:
    """The k nearest bank rows of each query [Q, D], searched in chunks of `chunk` queries.

    k is clipped to the bank size. Rows FAISS could not fill (IVF with few probes) get idx -1 and
    similarity -inf.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = max(1, min(int(k), index.ntotal))
    sims = np.empty((len(queries), k), dtype=np.float32)
    idx = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), chunk):
        s, i = index.search(queries[start : start + chunk], k)
        sims[start : start + chunk] = s
        idx[start : start + chunk] = i
    sims[idx < 0] = -np.inf
    return SearchResult(sims, idx)


def topk_predictions(scores: np.ndarray, k: int = 5) -> np.ndarray:
    """The k best classes of each row of scores [Q, C], best first ([Q, min(k, C)]); ties -> lower class."""
    k = min(k, scores.shape[1])
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def accuracy_metrics(pred: np.ndarray, labels: np.ndarray, top5: bool = True) -> dict[str, float]:
    """top1, top5 (unless top5 is False) and mean per-class accuracy (in %) from ranked
    predictions [Q, >=1] and labels [Q]."""
    correct1 = pred[:, 0] == labels
    classes = np.unique(labels)
    per_class = [correct1[labels == c].mean() for c in classes]
    out = {"top1": float(100 * correct1.mean())}
    if top5:
        out["top5"] = float(100 * (pred[:, :5] == labels[:, None]).any(axis=1).mean())
    out["mean_per_class"] = float(100 * np.mean(per_class))
    return out


def knn_classify(
    result: SearchResult,
    bank_labels: np.ndarray,
    query_labels: np.ndarray,
    ks: tuple[int, ...] | list[int],
    temperature: float,
    num_classes: int | None = None,
) -> dict[int, dict[str, float]]:
    """Accuracy of the weighted vote for every k in ks, from one search with k >= max(ks).

    bank_labels: [N] ints >= 0; query_labels: [Q]. Returns {k: {top1, top5, mean_per_class}}.
    top5 is left out when the bank has 5 classes or fewer (it would always be 100%).
    A k larger than the search width is clipped (and reported under its requested value).
    """
    bank_labels = np.asarray(bank_labels, dtype=np.int64)
    query_labels = np.asarray(query_labels, dtype=np.int64)
    if num_classes is None:
        num_classes = int(max(bank_labels.max(initial=0), query_labels.max(initial=0))) + 1
    neighbor_labels = np.where(result.idx >= 0, bank_labels[np.clip(result.idx, 0, None)], -1)
    with_top5 = len(np.unique(bank_labels)) > 5
    out: dict[int, dict[str, float]] = {}
    for k in sorted(set(int(k) for k in ks)):
        kk = min(k, result.idx.shape[1])
        scores = vote(result.sims[:, :kk], neighbor_labels[:, :kk], num_classes, temperature)
        out[k] = accuracy_metrics(topk_predictions(scores, 5), query_labels, with_top5)
    return out


def predict(
    result: SearchResult, bank_labels: np.ndarray, k: int, temperature: float, num_classes: int
) -> np.ndarray:
    """Top-1 predicted class [Q] of the weighted vote at k."""
    bank_labels = np.asarray(bank_labels, dtype=np.int64)
    neighbor_labels = np.where(result.idx >= 0, bank_labels[np.clip(result.idx, 0, None)], -1)
    kk = min(k, result.idx.shape[1])
    return topk_predictions(vote(result.sims[:, :kk], neighbor_labels[:, :kk], num_classes, temperature), 1)[
        :, 0
    ]
