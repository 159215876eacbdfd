"""Linear probe on frozen features: a grid of linear heads trained together, chosen on a validation split.

DINOv2's protocol in spirit, on the cached embeddings of knn-eval. The grid is feature choice x
learning rate: the feature choices are ``"cls"`` (the L2-normalised CLS vector) and, when the model
has patch tokens, ``"cls+mean_patch"`` (CLS concatenated with the mean patch token). A seeded split
carves ``VAL_FRACTION`` of the bank off as validation; for each feature choice one head per learning
rate of ``LEARNING_RATES`` is trained on the rest at once (one [D, H x C] matrix, AdamW, cosine
decay, ``STEPS`` steps of full or mini batches, cross-entropy); the (feature, lr) with the best
validation top-1 (ties: the earlier feature choice, then the smaller lr) is refitted on the whole
bank and scored on the test set. Features are standardised per dimension with the training rows'
mean and std first, so each part of a concatenation is standardised on its own (still a linear
probe: it folds into the head).
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

from cospress.errors import ConfigError

log = logging.getLogger(__name__)

LEARNING_RATES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
VAL_FRACTION = 0.2
STEPS = 300
BATCH = 512  # rows per step at most: the cost does not grow with the bank
WEIGHT_DECAY = 1e-4
BETAS = (0.9, 0.999)


def train_heads(
    x: np.ndarray, y: np.ndarray, num_classes: int, lrs: tuple[float, ...], seed: int, steps: int = STEPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [H, D, C], biases [H, C]) of one softmax head per learning rate in lrs, trained
    together on features x [N, D] (standardised) with labels y [N] in [0, num_classes).

    The heads sit side by side in one [D, H x C] matrix; the cross-entropy gradient and AdamW
    (decoupled weight decay, cosine decay of each head's learning rate) are written out, no autograd."""
    gen = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    onehot = torch.nn.functional.one_hot(torch.from_numpy(y.astype(np.int64)), num_classes).float()
    heads, dim = len(lrs), x.shape[1]
    params = [torch.zeros(dim, heads * num_classes), torch.zeros(heads * num_classes)]  # W, b
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    lr_col = torch.tensor(lrs, dtype=torch.float32).repeat_interleave(num_classes)  # each column's head
    batch, (beta1, beta2) = min(BATCH, len(x)), BETAS
    for step in range(1, steps + 1):
        rows = torch.randperm(len(x), generator=gen)[:batch]
        xb = xt[rows]
        logits = (xb @ params[0] + params[1]).view(batch, heads, num_classes)
        residual = (logits.softmax(-1) - onehot[rows, None]).view(batch, -1) / batch  # dCE/dlogits
        grads = [xb.T @ residual, residual.sum(0)]
        lr = lr_col * 0.5 * (1 + math.cos(math.pi * (step - 1) / steps))
        for p, g, (m, v) in zip(params, grads, moments, strict=True):
            m.lerp_(g, 1 - beta1)
            v.lerp_(g * g, 1 - beta2)
            adam = (m / (1 - beta1**step)) / ((v / (1 - beta2**step)).sqrt_() + 1e-8)
            p.sub_(lr * (adam + WEIGHT_DECAY * p))
    return params[0].view(dim, heads, num_classes).permute(1, 0, 2), params[1].view(heads, num_classes)


def predict(w: torch.Tensor, b: torch.Tensor, x: np.ndarray) -> np.ndarray:
    """Predicted classes [H, N] of each head for features x [N, D]."""
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    with torch.no_grad():
        return (torch.einsum("nd,hdc->hnc", xt, w) + b[:, None]).argmax(-1).numpy()  # [H, N]


def _split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows) of n, VAL_FRACTION of them as validation, drawn by seed."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, round(VAL_FRACTION * n))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _standardise(x: np.ndarray, fit: np.ndarray) -> np.ndarray:
    mean, std = fit.mean(0), fit.std(0) + 1e-6
    return (x - mean) / std


def feature_choices(
    train: np.ndarray, test: np.ndarray, train_patch: np.ndarray | None, test_patch: np.ndarray | None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{feature choice: (train features, test features)}: "cls", then "cls+mean_patch" (CLS and
    the mean patch token concatenated) when both mean patch arrays are given."""
    choices = {"cls": (train, test)}
    if train_patch is not None and test_patch is not None:
        choices["cls+mean_patch"] = (
            np.concatenate([train, train_patch], axis=1),
            np.concatenate([test, test_patch], axis=1),
        )
    return choices


def linear_probe(
    train: np.ndarray,
    train_labels: np.ndarray,
    test: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    seed: int = 0,
    *,
    train_patch: np.ndarray | None = None,
    test_patch: np.ndarray | None = None,
) -> dict:
    """The linear probe's report entry: the chosen features and learning rate, validation and test
    top-1 %, the validation top-1 of every (feature, lr) as ``grid[feature][lr]``, the row counts
    and the seconds taken.

    train / test: CLS features [N, D]; train_patch / test_patch: mean patch tokens [N, D'] or None
    (then CLS only); labels [N] in [0, num_classes)."""
    if len(train) < 2 or len(test) == 0:
        raise ConfigError("the linear probe needs at least 2 bank images and 1 test image")
    start, threads = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(1)  # [512, D] x [D, H x C] products: threads cost more in sync than they save
    try:
        choices = feature_choices(train, test, train_patch, test_patch)
        result = _probe(choices, train_labels, test_labels, num_classes, seed)
    finally:
        torch.set_num_threads(threads)
    result["seconds"] = round(time.perf_counter() - start, 3)
    log.info(
        "linear probe: %s, lr %g (val top-1 %.2f%%), test top-1 %.2f%% in %.1f s",
        result["features"], result["lr"], result["val_top1"], result["top1"], result["seconds"],
    )  # fmt: skip
    return result


def _probe(
    choices: dict[str, tuple[np.ndarray, np.ndarray]],
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    seed: int,
) -> dict:
    tr, va = _split(len(train_labels), seed)
    val_top1 = {}  # feature choice -> [H] validation top-1 %
    for name, (train, _) in choices.items():
        x = _standardise(train, train[tr])
        w, b = train_heads(x[tr], train_labels[tr], num_classes, LEARNING_RATES, seed)
        val_top1[name] = 100 * (predict(w, b, x[va]) == train_labels[va]).mean(1)
    scores = np.stack(list(val_top1.values()))  # [F, H]
    f_best, h_best = np.unravel_index(
        int(np.argmax(scores)), scores.shape
    )  # ties: first feature, smallest lr
    features, lr = list(choices)[f_best], LEARNING_RATES[h_best]
    train, test = choices[features]
    w, b = train_heads(_standardise(train, train), train_labels, num_classes, (lr,), seed)
    test_pred = predict(w, b, _standardise(test, train))[0]
    result = {
        "features": features,
        "lr": lr,
        "val_top1": float(scores[f_best, h_best]),
        "top1": float(100 * (test_pred == test_labels).mean()),
        "grid": {
            name: {f"{g:g}": float(v) for g, v in zip(LEARNING_RATES, top1, strict=True)}
            for name, top1 in val_top1.items()
        },
        "train": int(len(tr)),
        "val": int(len(va)),
        "test": int(len(test)),
        "steps": STEPS,
    }
    return result
