"""kNN out-of-distribution scores and threshold-free detection metrics.

Scores are "higher = more in-distribution": the cosine to the nearest bank vector (max cosine) and
the cosine to the k-th nearest (Sun et al., ICML 2022, on normalised features). Metrics treat the
in-distribution (ID) set as the positive class, with ties between scores handled exactly (one ROC
point per distinct score), so they agree with scikit-learn's `roc_auc_score` and
`average_precision_score`.
"""

from __future__ import annotations

import numpy as np

from cospress.errors import ConfigError


def knn_scores(sims: np.ndarray, ood_k: int) -> dict[str, np.ndarray]:
    """OOD scores [Q] from the sorted neighbour similarities sims [Q, k] (most similar first).

    Returns {"max_cos": sims[:, 0], f"knn{k}": sims[:, k-1]} with k clipped to the search width.
    """
    k = max(1, min(int(ood_k), sims.shape[1]))
    return {"max_cos": sims[:, 0].astype(np.float64), f"knn{k}": sims[:, k - 1].astype(np.float64)}


def roc_curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), one point per distinct score, from (0, 0) to (1, 1).

    scores: [N] (higher = predicted positive); positive: [N] bool. thresholds[0] = +inf.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ConfigError(
            "OOD metrics need both in-distribution and OOD samples; check --ood / --ood-classes"
        )
    order = np.argsort(-scores, kind="mergesort")
    s, p = scores[order], positive[order]
    last_of_group = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # last index of each distinct score
    tp = np.cumsum(p)[last_of_group]
    fp = (last_of_group + 1) - tp
    tpr = np.r_[0.0, tp / n_pos]
    fpr = np.r_[0.0, fp / n_neg]
    thresholds = np.r_[np.inf, s[last_of_group]]
    return fpr, tpr, thresholds


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (trapezoid, so a tie counts one half)."""
    fpr, tpr, _ = roc_curve(scores, positive)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def fpr_at_tpr(scores: np.ndarray, positive: np.ndarray, tpr_level: float = 0.95) -> float:
    """False-positive rate at the first threshold whose true-positive rate reaches tpr_level."""
    fpr, tpr, _ = roc_curve(scores, positive)
    return float(fpr[np.searchsorted(tpr, tpr_level - 1e-12, side="left")])


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the precision-recall curve as sum_n (R_n - R_{n-1}) P_n over distinct thresholds."""
    fpr, tpr, _ = roc_curve(scores, positive)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    tp, fp = tpr[1:] * n_pos, fpr[1:] * n_neg
    precision = tp / np.maximum(tp + fp, 1)
    return float(np.sum(np.diff(tpr) * precision))


def ood_metrics(id_scores: np.ndarray, ood_scores: np.ndarray) -> dict[str, float]:
    """AUROC, FPR at 95% TPR (ID positive), AUPR-in (ID positive) and AUPR-out (OOD positive, -score).

    id_scores: [N_id], ood_scores: [N_ood], higher = more in-distribution.
    """
    scores = np.r_[np.asarray(id_scores, np.float64), np.asarray(ood_scores, np.float64)]
    is_id = np.r_[np.ones(len(id_scores), bool), np.zeros(len(ood_scores), bool)]
    return {
        "auroc": auroc(scores, is_id),
        "fpr95": fpr_at_tpr(scores, is_id, 0.95),
        "aupr_in": average_precision(scores, is_id),
        "aupr_out": average_precision(-scores, ~is_id),
    }
