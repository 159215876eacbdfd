"""The weighted kNN vote (DINO's): one function, used by distill's held-out validation
(``distill.val.knn_accuracy``) and by knn-eval (``evaluate.knn``)."""

from __future__ import annotations

import numpy as np


def vote(sims: np.ndarray, neighbor_labels: np.ndarray, num_classes: int, temperature: float) -> np.ndarray:
    """Class scores [Q, C] = sum over the neighbours of exp(sim / T), per neighbour label.

    sims, neighbor_labels: [Q, k]; a label < 0 (no neighbour) or a non-finite sim contributes nothing.
    """
    weights = np.exp((sims.astype(np.float64) - 1.0) / temperature)  # shift by the max cosine: no overflow
    weights[~np.isfinite(sims) | (neighbor_labels < 0)] = 0.0
    scores = np.zeros((sims.shape[0], num_classes), dtype=np.float64)
    rows = np.repeat(np.arange(sims.shape[0]), sims.shape[1])
    labels = np.clip(neighbor_labels, 0, None).ravel()
    np.add.at(scores, (rows, labels), weights.ravel())
    return scores
