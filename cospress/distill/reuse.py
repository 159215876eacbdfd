"""Reuse: how many times a run shows each stored view (epochs x R / stored views), from its batch plan.

A store holds a fixed set of views of every image; a long schedule shows each of them many times.
The reuse study (docs/results.md, "The reuse curve") measured a cached student against online
distillation (fresh views every step) up to :data:`MEASURED_REUSE`; :data:`LOSS_REUSE` is the reuse
at which it measured a cached student more than 1 point of kNN top-1 behind online (None: no such
point up to the highest reuse measured). A run planned beyond either gets one warning line.

Counts are exact: they replay :class:`~cospress.distill.data.BatchPlan` (the epoch order and the R
views drawn for every row) for up to :data:`COUNTED_ROWS` training rows (all of them in a run with
fewer), so a resumed run counts the same. Under ``--reader stream`` the views of a row are the same
draw (``choose_views``) but the rows left out of an epoch's last batches follow the stream order, so
there the counts replay the random-access plan and are exact only up to those few rows.

With ``--refresh F`` (:mod:`cospress.distill.refresh`) a fraction F of every batch's view slots is
drawn fresh instead of read: each stored view is shown (1 - F) times as often (planned reuse =
epochs x R x (1 - F) / stored views), and the fresh views are counted apart (``fresh_views_mean``,
each shown once). The counter replays the same keyed choice of fresh slots, so these counts are
exact too.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cospress.distill.data import choose_views, epoch_permutation
from cospress.distill.refresh import fresh_mask
from cospress.errors import ConfigError
from cospress.utils import atomic_write_json

log = logging.getLogger(__name__)

MEASURED_REUSE = 100.0  # the highest reuse the reuse study measured
LOSS_REUSE: float | None = 100.0  # the lowest reuse where it measured a loss > 1 point (None: none)
SAFE_REUSE: float | None = 100 / 3  # the highest reuse below LOSS_REUSE it measured without one
REFRESH_MEASURED = 0.25  # the --refresh F the study measured at MEASURED_REUSE (closing the AUROC gap)
COUNTED_ROWS = 4096
STUDY = "docs/results.md#the-reuse-curve"


def planned_reuse(epochs: float, views_per_image: int, stored_views: int, refresh: float = 0.0) -> float:
    """Times each stored view is shown over a run, on average: epochs x R x (1 - refresh) / stored views."""
    return float(epochs) * views_per_image * (1.0 - refresh) / max(stored_views, 1)


def recommend_k(epochs: float, views_per_image: int, limit: float | None = None, refresh: float = 0.0) -> int:
    """The fewest stored views that keep the planned reuse within ``limit`` (default: the safe reuse)."""
    limit = safe_reuse() if limit is None else limit
    return max(views_per_image, math.ceil(float(epochs) * views_per_image * (1.0 - refresh) / limit))


def safe_reuse() -> float:
    """The highest reuse at which the study found a cached student within 1 point of online."""
    if LOSS_REUSE is None:
        return MEASURED_REUSE
    return SAFE_REUSE if SAFE_REUSE is not None else LOSS_REUSE


def reuse_warning(epochs: float, views_per_image: int, stored_views: int, refresh: float = 0.0) -> str | None:
    """One line when the planned reuse passes what the study measured as safe, with the K that avoids it."""
    reuse = planned_reuse(epochs, views_per_image, stored_views, refresh)
    if reuse <= safe_reuse() or (
        refresh >= REFRESH_MEASURED and reuse <= MEASURED_REUSE * (1 - REFRESH_MEASURED)
    ):
        return None  # within what the study measured without a loss (cached, or with --refresh)
    k = recommend_k(epochs, views_per_image, refresh=refresh)
    if LOSS_REUSE is not None and reuse >= LOSS_REUSE:
        what = (
            f"the reuse study measured a cached student > 1 point behind online from reuse {LOSS_REUSE:.3g}"
            " (OOD AUROC, and a lower Spearman rho; kNN held)"
        )
    elif LOSS_REUSE is not None:
        what = (
            f"the reuse study measured no loss at reuse {safe_reuse():.3g} and a loss > 1 point behind online "
            f"at {LOSS_REUSE:g}; between them is unmeasured"
        )
    else:
        what = f"the reuse study measured no loss up to reuse {MEASURED_REUSE:g}; beyond it is unmeasured"
    fresh = f" x (1 - refresh {refresh:g})" if refresh else ""
    return (
        f"planned reuse {reuse:.3g} (each stored view shown ~{reuse:.3g} times: {epochs:g} epochs x R={views_per_image}"
        f"{fresh} / {stored_views} stored views): {what} ({STUDY}); a store with K >= {k} views keeps it within"
        f" {safe_reuse():.3g} (extract-teacher --views {k}, or --add-views {k - stored_views} --to STORE;"
        f" or train online with --teacher){_refresh_hint(refresh)}"
    )


def _refresh_hint(refresh: float) -> str:
    """The warning's last clause: what the study measured for ``--refresh`` at the highest reuse."""
    if refresh >= REFRESH_MEASURED:
        return ""
    return (
        f"; or keep this store and add --refresh {REFRESH_MEASURED:g} (a quarter of each batch's views fresh: at reuse"
        f" {MEASURED_REUSE:g} the study measured it within 1 OOD AUROC point of online)"
    )


def plan_line(
    images: int,
    epochs: float,
    views_per_image: int,
    stored_views: int | None,
    store_bytes: int | None = None,
    refresh: float = 0.0,
) -> str:
    """The planner's one line: reuse, distinct views per image, store size and the K the study recommends."""
    if stored_views is None:
        return (
            f"reuse: fresh views (online): {images} images x {epochs:g} epochs x R={views_per_image} = "
            f"{images * epochs * views_per_image:,.0f} teacher forwards, each view shown once"
        )
    reuse = planned_reuse(epochs, views_per_image, stored_views, refresh)
    size = f", store {store_bytes / 2**20:,.1f} MiB" if store_bytes else ""
    shown = epochs * views_per_image * (1.0 - refresh)
    fresh = epochs * views_per_image * refresh
    what = (
        f" with --refresh {refresh:g} (~{fresh:.3g} fresh views per image, ~{images * fresh:,.0f} teacher forwards)"
        if refresh
        else ""
    )
    return (
        f"reuse: {images} images x {stored_views} stored views{size}; {epochs:g} epochs x R={views_per_image}{what} "
        f"show each stored view ~{reuse:.1f} times (<= {min(stored_views, shown):g} distinct stored views"
        f" per image); recommended K for this schedule: >= {recommend_k(epochs, views_per_image, refresh=refresh)}"
        f" (reuse <= {safe_reuse():.3g}, {STUDY})"
    )


@dataclass
class ReuseCounter:
    """Times each stored view of the counted training rows has been shown, epoch by epoch.

    ``stored_views`` None: online (every view is fresh: shown once; distinct views grow by R per epoch).
    ``refresh``: the fraction of each batch's view slots drawn fresh (``--refresh``), counted in ``fresh``.
    """

    train_rows: np.ndarray
    seed: int
    views_per_image: int
    images_per_batch: int
    stored_views: int | None
    refresh: float = 0.0

    def __post_init__(self) -> None:
        rows = np.asarray(self.train_rows, dtype=np.int64)
        pick = np.linspace(0, len(rows) - 1, min(len(rows), COUNTED_ROWS)).round().astype(np.int64)
        self.counted = rows[np.unique(pick)] if len(rows) else rows
        self.shown_epochs = np.zeros(len(self.counted), dtype=np.int64)
        self.counts = np.zeros((len(self.counted), self.stored_views or 1), dtype=np.int64)
        self.fresh = np.zeros(len(self.counted), dtype=np.int64)  # fresh views shown (--refresh)

    def add_epoch(self, epoch: int) -> None:
        """Count the views shown in ``epoch`` (the full batches of its plan)."""
        order = epoch_permutation(np.asarray(self.train_rows, dtype=np.int64), self.seed, epoch)
        used = order[: (len(order) // self.images_per_batch) * self.images_per_batch]
        shown = np.isin(self.counted, used)
        self.shown_epochs += shown
        if self.stored_views is None:
            return
        r, at, masks = self.views_per_image, np.argsort(used, kind="stable"), {}
        if self.refresh and len(used):  # where each counted row sits in the epoch's order
            position = at[np.searchsorted(used, self.counted, sorter=at).clip(0, len(used) - 1)]
        for i in np.flatnonzero(shown):
            row, keep = int(self.counted[i]), np.ones(r, dtype=bool)
            if self.refresh:  # the slots of this row drawn fresh in its batch
                step, image = divmod(int(position[i]), self.images_per_batch)
                if step not in masks:
                    masks[step] = fresh_mask(self.seed, epoch, step, self.images_per_batch, r, self.refresh)
                keep = ~masks[step][image]
                self.fresh[i] += r - int(keep.sum())
            self.counts[i, choose_views(self.seed, epoch, row, self.stored_views, r)[keep]] += 1

    def record(self, epoch: int) -> dict[str, Any]:
        """The metrics row after ``epoch``: shown_mean / shown_max per stored view, distinct views per image."""
        base = {"phase": "reuse", "epoch": epoch, "views_per_image": self.views_per_image}
        base["rows_counted"] = len(self.counted)
        if self.stored_views is None:
            distinct = self.shown_epochs * self.views_per_image
            return {**base, "fresh": True, "stored_views": None, "shown_mean": 1.0, "shown_max": 1,
                    "distinct_views_mean": float(distinct.mean()) if len(distinct) else 0.0,
                    "refresh": 1.0, "fresh_views_mean": float(distinct.mean()) if len(distinct) else 0.0}  # fmt: skip
        counts, fresh = self.counts, self.fresh
        distinct = (counts > 0).sum(axis=1) + fresh  # every fresh view is a new one
        return {
            **base,
            "fresh": False,
            "stored_views": self.stored_views,
            "shown_mean": float(counts.mean()) if counts.size else 0.0,
            "shown_max": int(counts.max()) if counts.size else 0,
            "distinct_views_mean": float(distinct.mean()) if counts.size else 0.0,
            "refresh": self.refresh,
            "fresh_views_mean": float(fresh.mean()) if len(fresh) else 0.0,
        }


def reuse_header(
    images: int,
    epochs: float,
    views_per_image: int,
    stored_views: int | None,
    store_bytes: int | None,
    refresh: float = 0.0,
) -> dict[str, Any]:
    """run.json's "reuse" entry at the start: the plan (and the warning, if any); per-epoch rows follow."""
    fresh = stored_views is None
    return {
        "fresh": fresh,
        "images": images,
        "stored_views": stored_views,
        "views_per_image": views_per_image,
        "epochs": epochs,
        "refresh": refresh,
        "planned_fresh_views": float(epochs) * views_per_image * (1.0 if fresh else refresh),  # per image
        "planned_reuse": None if fresh else planned_reuse(epochs, views_per_image, stored_views, refresh),
        "recommended_k": recommend_k(epochs, views_per_image, refresh=refresh),
        "store_bytes": store_bytes,
        "safe_reuse": safe_reuse(),
        "warning": None if fresh else reuse_warning(epochs, views_per_image, stored_views, refresh),
        "per_epoch": [],
    }


class ReuseLog:
    """Reuse accounting of one run: the start-up line (and warning), then one "reuse" metrics row and
    one run.json entry per epoch. ``data``: the run's TrainData; epochs before ``start_epoch`` (resume)
    are counted again, silently."""

    def __init__(self, cfg: Any, data: Any, out: Path, start_epoch: int, enabled: bool) -> None:
        self.enabled, self.run_json = enabled, Path(out) / "run.json"
        stored = None if data.online is not None else int(data.reader.stored_views)
        r, train, refresh = (
            int(cfg.views_per_image),
            data.split.train,
            float(getattr(cfg, "refresh", 0.0) or 0.0),
        )
        self.counter = ReuseCounter(train, cfg.seed, r, cfg.batch_size // r, stored, refresh)
        if not enabled:
            return
        size = None if stored is None else int(data.reader.layout.estimate_bytes())
        self.header = reuse_header(len(train), cfg.epochs, r, stored, size, refresh)
        for epoch in range(start_epoch):
            self.counter.add_epoch(epoch)
            self.header["per_epoch"].append(self.counter.record(epoch))
        log.info("%s", plan_line(len(train), cfg.epochs, r, stored, size, refresh))
        if self.header["warning"]:
            log.warning("%s", self.header["warning"])
        self._write_header()

    def epoch_done(self, epoch: int, step: int, write: Any) -> None:
        """Count ``epoch`` (just trained, ``step`` steps so far) and write its row with ``write``."""
        if not self.enabled:
            return
        self.counter.add_epoch(epoch)
        row = {**self.counter.record(epoch), "step": step}
        write(row)
        self.header["per_epoch"] = [*self.header["per_epoch"][:epoch], row]
        self._write_header()

    def _write_header(self) -> None:
        doc = json.loads(self.run_json.read_text()) if self.run_json.is_file() else {}
        doc["reuse"] = self.header
        atomic_write_json(self.run_json, doc)


def plan_store(cfg: Any) -> dict[str, Any]:
    """`cospress plan`: reuse, store size and the recommended K for N images, K, R, epochs (``PlanConfig``)."""
    from cospress.store.layout import StoreLayout

    n, k, per_view = cfg.images, cfg.views, None
    if cfg.store:
        from cospress.store.reader import StoreReader

        reader = StoreReader(cfg.store)
        n = n or reader.num_rows
        k = k or reader.stored_views
        per_view = reader.layout.estimate_bytes() / max(reader.num_rows * reader.stored_views, 1)
    if not n or not k:
        raise ConfigError("plan needs --images and --views (or --store)")
    if per_view is None:
        tokens = cfg.num_tokens > 0
        one = StoreLayout(1, 1, 1, cfg.dim, max(cfg.num_tokens, 1), 11, tokens)
        per_view = one.estimate_bytes()
    r, epochs, f = cfg.views_per_image, cfg.epochs, float(getattr(cfg, "refresh", 0.0) or 0.0)
    if not 0.0 <= f <= 1.0:
        raise ConfigError(f"refresh={f} must be a fraction of each batch's views, 0 < F <= 1 (0 = off)")
    rec = max(recommend_k(epochs, r, refresh=f), 1)
    gib = 2**30
    fresh = {"fresh views per image (--refresh)": f"{epochs * r * f:g}"} if f else {}
    return {
        "images (N)": n,
        "views per image (K)": k,
        "R x epochs": f"{r} x {epochs:g}",
        "reuse (epochs x R / K)"
        if not f
        else "reuse (epochs x R x (1 - F) / K)": f"{planned_reuse(epochs, r, k, f):.1f}",
        **fresh,
        "store size": f"{n * k * per_view / gib:,.2f} GiB",
        "recommended K": f"{rec} (reuse <= {safe_reuse():.3g}, {STUDY})",
        "store size at the recommended K": f"{n * rec * per_view / gib:,.2f} GiB",
        "warning": reuse_warning(epochs, r, k, f),
    }
