"""Stage 2 hybrid mode (``--refresh F``): which views of each batch are drawn fresh instead of read.

A store shows its K views again and again; the reuse study (docs/results.md, "The reuse curve")
measured a cached student behind online distillation at reuse 100. With ``--refresh F`` a fraction
F of every global batch's views is replaced by fresh views: new view params drawn from the store's
view policy, replayed on the images and run through the store's teacher at training time
(:func:`cospress.distill.online.load_refresh_teacher`); the rest are read from the store as usual.

Which views are fresh is a pure function of (seed, epoch, step): :func:`fresh_mask` picks
``fresh_count`` of the batch's images x R view slots with a keyed RNG, over the whole global batch
(each rank takes its images' rows of the mask), so a resumed run and the reuse accounting
(:mod:`cospress.distill.reuse`) see the same slots. A fresh view of image ``key`` in slot ``j`` of
epoch ``e`` is view number ``stored_views + e * R + j`` of stage 1's keyed RNG under the run's seed
(:class:`cospress.distill.online.OnlineViews` with ``offset`` = the store's stored views): new in
every epoch and never one of the stored views (with the store's seed, the views a larger store
would hold next).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cospress.errors import ConfigError


def fresh_count(views: int, fraction: float) -> int:
    """Fresh views in a batch of ``views``: round(F x views), at least 1 when F > 0, all when F >= 1."""
    if fraction <= 0:
        return 0
    return min(views, max(1, int(round(fraction * views))))


def fresh_mask(
    seed: int, epoch: int, step: int, images: int, views_per_image: int, fraction: float
) -> np.ndarray:
    """bool [images, R]: the view slots of global batch ``step`` of ``epoch`` drawn fresh (keyed RNG)."""
    total = images * views_per_image
    m = fresh_count(total, fraction)
    mask = np.zeros(total, dtype=bool)
    if m >= total:
        mask[:] = True
    elif m:
        rng = np.random.default_rng([int(seed), int(epoch), int(step), 0xF2E5])
        mask[rng.choice(total, size=m, replace=False)] = True
    return mask.reshape(images, views_per_image)


def check_refresh(cfg: Any, reader: Any) -> None:
    """``--refresh`` before a run starts: a ``--teacher`` must name the store's teacher (name or
    fingerprint, else one line); the store must be read at random (the stream reader is refused)."""
    from cospress.distill.streaming import choose_reader

    if cfg.teacher is not None:
        reader.check_identity(expect_teacher=cfg.teacher)
    mode, why = choose_reader(cfg, reader)
    if mode == "stream":
        raise ConfigError(
            f"--refresh needs the random-access reader, not the stream reader ({why}): pass --reader random "
            "(with --cache-dir for a store read from a URL)"
        )
