"""kNN out-of-distribution scores and threshold-free detection metrics.

Scores are "higher = more in-distribution": the cosine to the nearest bank vector (max cosine) and
the cosine to the k-th nearest (Sun et al., ICML 2022, on normalised features). Metrics treat the
in-distribution (ID) set as the positive class, with ties between scores handled exactly (one ROC
point per distinct score), so they agree with scikit-learn's `roc_auc_score` and
`average_precision_score`.

OOD sets come from ``--ood [GROUP:][NAME=]SRC`` (:func:`parse_ood_specs`): each set is scored on its
own, all of them pooled, and each group (near / far) as the mean of its sets' metrics (OpenOOD).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cospress.errors import ConfigError
from cospress.utils import redact_text

OOD_GROUPS = ("near", "far")
HELDOUT_SET = "heldout_classes"  # the test set's --ood-classes rows: a near set
_SPEC = re.compile(r"^(?:(?P<group>near|far):)?(?:(?P<name>[\w.+-]+)=)?(?P<src>.+)$")


@dataclass(frozen=True)
class OodSpec:
    """One ``--ood`` entry: the set's name in the report, its group (near / far / None), its source."""

    name: str
    group: str | None
    src: str


def parse_ood_specs(entries: list[str]) -> list[OodSpec]:
    """``[near:|far:][NAME=]SRC`` entries -> specs; NAME defaults to SRC (credentials removed).

    A NAME is letters, digits and ``_.+-``, so a URL's ``?a=b`` is never taken for one."""
    specs, seen = [], {HELDOUT_SET}
    for entry in entries:
        m = _SPEC.match(entry.strip())
        if not m:
            raise ConfigError(f"empty --ood entry {entry!r}; use [near:|far:][NAME=]SRC")
        name = m["name"] or redact_text(m["src"])
        if name in seen:
            raise ConfigError(f"two OOD sets are named {name!r}; give each --ood its own NAME=")
        seen.add(name)
        specs.append(OodSpec(name, m["group"], m["src"]))
    return specs


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


def group_means(per_set: dict[str, dict[str, dict[str, float]]], groups: dict[str, str | None]) -> dict:
    """{group: {"sets": [names], "mean": {score: {metric: mean over the group's sets}}}}.

    per_set: {set: {score: metrics}}; groups: {set: group or None}; groups with no set are left out."""
    out: dict[str, Any] = {}
    for group in OOD_GROUPS:
        names = [n for n in per_set if groups.get(n) == group]
        if not names:
            continue
        scores = per_set[names[0]]
        mean = {s: {m: float(np.mean([per_set[n][s][m] for n in names])) for m in scores[s]} for s in scores}
        out[group] = {"sets": names, "mean": mean}
    return out


def score_sets(
    search: Callable[[np.ndarray], np.ndarray],
    id_sims: np.ndarray,
    sets: dict[str, np.ndarray],
    ood_k: int,
    groups: dict[str, str | None],
) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(report entries, {score: (ID scores, pooled OOD scores)} for the ROC plot) of the OOD sets.

    search(features [N, D]) -> sorted neighbour similarities [N, k]; id_sims: those of the ID queries;
    sets: {name: features}. Entries: ``ood`` (all sets pooled), ``ood_sets`` (one per set, when there
    are several) and ``ood_groups`` (see :func:`group_means`, when some set has a group)."""
    sets = {name: f for name, f in sets.items() if len(f)}
    if not sets:
        return {}, {}
    id_scores = knn_scores(id_sims, ood_k)
    per_set = {name: knn_scores(search(f), ood_k) for name, f in sets.items()}
    pooled = {s: np.concatenate([v[s] for v in per_set.values()]) for s in id_scores}
    result: dict[str, Any] = {"ood": {s: ood_metrics(id_scores[s], pooled[s]) for s in id_scores}}
    rows = {name: {s: ood_metrics(id_scores[s], v[s]) for s in id_scores} for name, v in per_set.items()}
    if len(per_set) > 1:
        result["ood_sets"] = rows
    if any(groups.get(name) for name in rows):
        result["ood_groups"] = group_means(rows, groups)
    return result, {s: (id_scores[s], pooled[s]) for s in id_scores}
