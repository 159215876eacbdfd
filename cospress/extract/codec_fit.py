"""Stage 1: the store's token codec (``--token-codec``); for pca, the projection fitted before the
first shard is written.

The projection is fitted once, by the process that creates the store, on the teacher's tokens of the
stored views of ``FIT_IMAGES`` images spread evenly over the source (every ``HOLDOUT``-th of them only
checks the fidelity); every other rank, a resume and an append use the projection the store holds.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cospress.errors import StoreError
from cospress.extract.config import ExtractConfig
from cospress.extract.reader import ViewDataset
from cospress.runtime import autocast, autocast_dtype
from cospress.store.codecs import Projection, fit_projection
from cospress.store.projection import codec_entry, read_projection
from cospress.store.records import detect, read_record
from cospress.utils import redact_text

log = logging.getLogger(__name__)

FIT_IMAGES = 128
HOLDOUT = 4


def stored_codec(out: Path) -> tuple[dict, Projection | None] | None:
    """The token codec (and projection) of the store at ``out``, or None when there is none yet."""
    try:
        identity = read_record(out, detect(out).identity)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    entry = identity.get("token_codec") or {"name": "fp16"}
    if entry.get("name") != "pca" or not identity.get("tokens"):
        return entry, None
    return entry, read_projection(out, identity, str(out))


def choose_codec(cfg: ExtractConfig, source: Any, teacher: Any) -> tuple[dict, Projection | None]:
    """The ``token_codec`` entry of this run's identity and, for pca, its projection: the store's own
    when it already has one that this run asks for (resume, append), else fitted now."""
    spec = cfg.codec()
    if spec.name != "pca":
        return codec_entry(spec.name), None
    have = None if cfg.overwrite else stored_codec(Path(cfg.out))
    if have is not None and have[0].get("name") == "pca":
        if spec.components in (None, have[0].get("components")):
            return have
    projection, fit = fit_sample(cfg, source, teacher, spec.components)
    return codec_entry("pca", projection, fit), projection


def _sample_tokens(cfg: ExtractConfig, source: Any, teacher: Any) -> tuple[np.ndarray, np.ndarray]:
    """float32 tokens [views, T, Dt] of the stored views of the sample images: (fit part, holdout part)."""
    dataset = ViewDataset(
        source, cfg.policy(), cfg.seed, cfg.views, cfg.center_view, teacher.input_size, cfg.max_pixels
    )
    n = len(dataset)
    rows = np.unique(np.linspace(0, n - 1, min(n, FIT_IMAGES)).round().astype(int))
    device = next(teacher.parameters()).device
    amp = autocast_dtype(cfg.precision, device)
    fit, check = [], []
    for i, row in enumerate(rows):
        images = dataset[int(row)]["images"]
        if images is None:
            continue
        with torch.inference_mode(), autocast(device, amp):
            tokens = teacher(images.to(device)).tokens.to(torch.float16)
        (check if (i % HOLDOUT == HOLDOUT - 1 and len(rows) >= HOLDOUT) else fit).append(
            tokens.float().cpu().numpy()
        )
    if not fit:
        raise StoreError(
            f"no image of {redact_text(cfg.data)} could be read to fit the pca token codec; check --data"
        )
    fit_tokens = np.concatenate(fit)
    return fit_tokens, np.concatenate(check) if check else fit_tokens


def fit_sample(
    cfg: ExtractConfig, source: Any, teacher: Any, components: int | None
) -> tuple[Projection, dict[str, Any]]:
    """Fit the projection on a sample of the source; returns it and what the fit recorded."""
    fit_tokens, holdout = _sample_tokens(cfg, source, teacher)
    projection, fidelity = fit_projection(fit_tokens, components, cfg.token_fidelity, holdout)
    info = {"views": int(len(fit_tokens)), "holdout_views": int(len(holdout)), "fidelity": round(fidelity, 6)}
    if components is None:
        info["target"] = float(cfg.token_fidelity)
    log.info(
        "pca token codec: %d of %d components, fitted on %d views; fidelity %.4f on %d held-out views "
        "(1 - mean |token-cosine error|)",
        projection.components, teacher.dim, info["views"], fidelity, info["holdout_views"],
    )  # fmt: skip
    return projection, info


__all__ = ["FIT_IMAGES", "choose_codec", "fit_sample", "stored_codec"]
