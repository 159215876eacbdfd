"""One kNN vote: distill's held-out validation and knn-eval score neighbours with the same function,
so the same features give the same top-1."""

from __future__ import annotations

import numpy as np
import torch

from cospress.distill import val
from cospress.evaluate import knn
from cospress.vote import vote


def test_distill_validation_and_knn_eval_agree() -> None:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 16))
    bank_labels, query_labels = rng.integers(0, 4, 300), rng.integers(0, 4, 120)
    bank = knn.l2_normalize(centers[bank_labels] + 1.5 * rng.normal(size=(300, 16)))
    query = knn.l2_normalize(centers[query_labels] + 1.5 * rng.normal(size=(120, 16)))
    assert val.vote is knn.vote is vote
    for k, temperature in ((1, 0.07), (20, 0.07), (50, 0.5)):
        distill_acc = val.knn_accuracy(
            torch.from_numpy(bank), torch.from_numpy(bank_labels), torch.from_numpy(query),
            torch.from_numpy(query_labels), k, temperature,
        )  # fmt: skip
        result = knn.search(knn.build_index(bank, use_gpu=False), query, k)
        eval_acc = knn.knn_classify(result, bank_labels, query_labels, [k], temperature)[k]["top1"]
        assert 0.3 < distill_acc < 1.0 and distill_acc * 100 == eval_acc, (k, distill_acc, eval_acc)


def test_vote_ignores_missing_neighbours() -> None:
    sims = np.array([[0.9, 0.8, -np.inf]], np.float32)
    scores = vote(sims, np.array([[1, 0, -1]]), 3, 0.1)
    assert scores[0, 2] == 0 and scores[0, 1] > scores[0, 0] > 0
