"""Stage 2 data: the row split, the deterministic batch plan, and datasets of replayed views + cached targets.

A global batch holds ``batch_size`` views: ``views_per_image`` (R) views of each of
``batch_size / R`` images, the R views drawn without replacement from the store's stored views
(K, + the centre view when kept).
Everything is a pure function of (seed, epoch, row), so a resumed run sees the same batches, and
every rank takes a contiguous slice of the images of a global batch (all R views of an image stay
on one rank, so the per-image local term needs no communication).

Images are looked up in the source BY KEY (never by position).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from cospress.data.device_decode import Encoded, pack, worker_read
from cospress.data.views import replay_view
from cospress.errors import ConfigError, StoreError
from cospress.runtime import DistContext

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- split
def is_val_key(key: str, fraction: float) -> bool:
    """True when sha256("val:" + key) falls in the first ``fraction`` of the hash space (stable, order-free).

    The hash is salted: ``--limit`` keeps the keys with the smallest unsalted sha256, and an unsalted
    split would put every one of them in the validation set.
    """
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha256(f"val:{key}".encode()).digest()[:8], "big")
    return h < fraction * 2.0**64


@dataclass
class RowSplit:
    """Store row indices (sorted) used for training and for validation; invalid rows are in neither."""

    train: np.ndarray
    val: np.ndarray


def split_rows(keys: list[str], valid: np.ndarray, val_fraction: float) -> RowSplit:
    """Valid rows split by sha256(key): ~``val_fraction`` of them are held out for kNN validation."""
    valid = np.asarray(valid).astype(bool)
    is_val = np.array([is_val_key(k, val_fraction) for k in keys], dtype=bool)
    train = np.flatnonzero(valid & ~is_val)
    val = np.flatnonzero(valid & is_val)
    return RowSplit(train=train.astype(np.int64), val=val.astype(np.int64))


# --------------------------------------------------------------------------- plan
def epoch_permutation(rows: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """A permutation of ``rows`` that depends only on (seed, epoch)."""
    rng = np.random.default_rng([int(seed), int(epoch), 0xC05])
    return rows[rng.permutation(len(rows))]


def choose_views(seed: int, epoch: int, row: int, stored_views: int, views_per_image: int) -> np.ndarray:
    """R = ``views_per_image`` distinct view indices in [0, stored_views) for one row and epoch (deterministic)."""
    rng = np.random.default_rng([int(seed), int(epoch), int(row), 0x71E])
    return np.sort(rng.choice(stored_views, size=views_per_image, replace=False)).astype(np.int64)


class BatchPlan:
    """The batches of one epoch for one rank: ``rows_views(step) -> (rows [n], views [n, R])``.

    ``steps`` = full global batches in the epoch (a short last batch is dropped: the global term
    depends on the batch size). The shape was checked once, by :func:`check_batch` in ``run.prepare``.
    """

    def __init__(
        self,
        train_rows: np.ndarray,
        *,
        seed: int,
        epoch: int,
        batch_size: int,
        views_per_image: int,
        stored_views: int,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.images_per_batch = batch_size // views_per_image
        self.local_images = self.images_per_batch // world
        self.order = epoch_permutation(np.asarray(train_rows, dtype=np.int64), seed, epoch)
        self.steps = len(self.order) // self.images_per_batch
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.views_per_image, self.stored_views = views_per_image, stored_views

    def __len__(self) -> int:
        return self.steps

    def global_rows(self, step: int) -> np.ndarray:
        start = step * self.images_per_batch
        return self.order[start : start + self.images_per_batch]

    def rows_views(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's (rows [n], view indices [n, R]) of global batch ``step``."""
        g = self.global_rows(step)
        rows = g[self.rank * self.local_images : (self.rank + 1) * self.local_images]
        views = [
            choose_views(self.seed, self.epoch, int(row), self.stored_views, self.views_per_image)
            for row in rows
        ]
        return rows, np.stack(views).reshape(len(rows), self.views_per_image)


def check_batch(batch_size: int, views_per_image: int, stored_views: int, world: int) -> None:
    """Refuse a batch that cannot be split into R views per image and equal per-rank slices
    (``run.prepare`` calls it, once per run: every ``BatchPlan`` of the run has this shape)."""
    if not 1 <= views_per_image <= stored_views:
        raise ConfigError(
            f"views_per_image={views_per_image} must be between 1 and the store's {stored_views} stored views"
        )
    if batch_size % views_per_image:
        raise ConfigError(f"batch_size={batch_size} must be a multiple of views_per_image={views_per_image}")
    images = batch_size // views_per_image
    if images % world:
        raise ConfigError(
            f"batch_size/views_per_image = {images} images must split evenly over {world} ranks"
        )


# --------------------------------------------------------------------------- source lookup
def key_index(store_keys: list[str], source_keys: list[str], rows: np.ndarray, spec: str) -> np.ndarray:
    """Source position of every store row (-1 for rows not needed); refuses a store key missing from the
    source. A binary search in the sorted source keys (one UTF-8 bytes array, not a dict of ~100 B/key)."""
    src = _key_array(source_keys)
    order = np.argsort(src, kind="stable")
    ordered = src[order]
    rows = np.asarray(rows, dtype=np.int64)
    want = _key_array([store_keys[int(r)] for r in rows])
    at = np.minimum(np.searchsorted(ordered, want), max(len(ordered) - 1, 0))
    found = ordered[at] == want if len(ordered) else np.zeros(len(want), bool)
    out = np.full(len(store_keys), -1, dtype=np.int64)
    out[rows[found]] = order[at[found]]
    if not found.all():
        missing = [store_keys[int(r)] for r in rows[~found]]
        raise StoreError(
            f"{len(missing)} store key(s) are not in source {spec!r} (first: {missing[0]!r}); "
            "pass --data with the image source the store was extracted from"
        )
    return out


def _key_array(keys: list[str]) -> np.ndarray:
    """Keys as one fixed-width bytes array (UTF-8), for sorting and binary search."""
    return np.array([k.encode() for k in keys], dtype=np.bytes_) if len(keys) else np.zeros(0, "S1")


# --------------------------------------------------------------------------- what a run reads
@dataclass
class TrainData:
    """What stage 2 reads: the store, its image source looked up by key, the row split and the kNN rows.

    ``source_index`` [num_rows]: source position of every train / val store row (-1 for the others);
    ``grid_t``: the teacher's token grid; ``bank_rows`` / ``val_rows``: labelled store rows of the
    kNN validation (bank from the training rows, queries from the held-out ones).
    """

    reader: Any
    lazy: _Lazy
    split: RowSplit
    source_index: np.ndarray
    grid_t: tuple[int, int]
    use_tokens: bool
    labels: np.ndarray
    bank_rows: np.ndarray
    val_rows: np.ndarray
    steps_per_epoch: int
    online: Any = None  # online mode: the OnlineTeacher (reader is None); None: targets from the store
    refresh: Any = None  # --refresh: the store's teacher (an OnlineTeacher) for the fresh views
    stream: Any = None  # distill.streaming.StreamSetup when the store is streamed; None: random access

    @property
    def knn(self) -> bool:
        """Whether there are labelled rows for kNN validation (else best = last)."""
        return len(self.val_rows) > 0 and len(self.bank_rows) > 0


def epoch_loader(
    data: TrainData, cfg: Any, ctx: DistContext, epoch: int, position: int, decode: str
) -> tuple[BatchPlan, torch.utils.data.DataLoader]:
    """This rank's batch plan for ``epoch`` and a loader of its batches from batch ``position`` on.

    ``cfg`` is the run's DistillConfig; each item is one whole batch (see :class:`DistillBatches`).
    """
    plan = BatchPlan(
        data.split.train,
        seed=cfg.seed,
        epoch=epoch,
        batch_size=cfg.batch_size,
        views_per_image=cfg.views_per_image,
        stored_views=cfg.views_per_image if data.online else data.reader.stored_views,
        rank=ctx.rank,
        world=ctx.world,
    )
    online = data.online.views if data.online else data.refresh.views if data.refresh else None
    batches = DistillBatches(
        data.lazy, plan, data.source_index, cfg.student_size, data.use_tokens, decode, online
    )
    loader = torch.utils.data.DataLoader(
        batches,
        batch_size=1,
        sampler=StepSampler(position, len(plan)),
        collate_fn=collate_batch,
        num_workers=cfg.workers,
        pin_memory=ctx.device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch),
    )
    return plan, loader


# --------------------------------------------------------------------------- datasets
class _Lazy:
    """Opens the store reader and the image source on first use in each process (DataLoader workers).

    ``source``: the source already open in this process, if any (it is not pickled to workers).
    """

    def __init__(
        self,
        store_url: str | None,
        cache_dir: str | None,
        source_spec: str,
        source: Any = None,
        limit: int | None = None,
    ) -> None:
        self.store_url, self.cache_dir, self.source_spec = store_url, cache_dir, source_spec
        self.limit = limit  # online mode: --limit
        self._reader: Any = None
        self._source: Any = source

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_reader": None, "_source": None}

    @property
    def reader(self) -> Any:
        if self._reader is None:
            from cospress.store.reader import StoreReader

            self._reader = StoreReader(self.store_url, cache_dir=self.cache_dir)
        return self._reader

    @property
    def source(self) -> Any:
        if self._source is None:
            from cospress.data.sources import open_source

            self._source = open_source(self.source_spec, limit=self.limit)
        return self._source


def read_targets(
    reader: Any, rows: np.ndarray, views: np.ndarray, tokens: bool, keep_int8: bool = False
) -> dict[str, Any]:
    """Cached targets of rows [n] x their views [n, R], flattened image-major to n*R views:

    cls f16 [n*R, Dt], tokens f16 [n*R, T, Dt] or None, params f32 [n*R, P] (the recorded view parameters).
    ``keep_int8``: an int8 store's tokens stay int8, with "token_scale" f16 [n*R, T] (`teacher_features`
    decodes them: half the bytes through the loader and to the device, no decode in the worker).
    """
    raw = keep_int8 and tokens and reader.layout.token_codec == "int8"
    data = reader.read_rows(np.asarray(rows, dtype=np.int64), views=np.asarray(views), tokens=tokens, raw=raw)

    def flat(a: Any) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t.reshape(-1, *t.shape[2:])

    out = {"cls": flat(data["cls"]), "params": flat(data["views"]), "tokens": None}
    if tokens and data.get("tokens") is not None:
        out["tokens"] = flat(data["tokens"])
    if raw:
        out["token_scale"] = flat(data["token_scale"])
    return out


class DistillBatches(Dataset):
    """Item ``step`` = this rank's part of one global batch (a whole batch per item, so a worker
    reads one batch of targets at once).

    decode "cpu": returns {"images": uint8 [n*R, 3, S, S] (replayed views at the student size),
    "cls": f16 [n*R, Dt], "tokens": f16 [n*R, T, Dt] or None, "params": f32 [n*R, P], "rows": int64 [n],
    "step": int}; views are image-major (image i's views at i*R .. i*R+R-1).
    decode "device" (bytes mode): "images" is None and the item also holds "encoded" (an
    :class:`~cospress.data.device_decode.EncodedBatch` of the n images);
    :func:`cospress.distill.prefetch.device_images` decodes and replays them on the compute device.
    ``online`` (``distill.online.OnlineViews``): view params drawn fresh, not read; "cls" / "tokens"
    None, "teacher_images" the views at the teacher's size (None in bytes mode). With a store
    (``--refresh``), only the slots ``online.fresh`` picks are drawn fresh (and in "teacher_images").
    """

    def __init__(
        self,
        lazy: _Lazy,
        plan: BatchPlan,
        source_index: np.ndarray,
        student_size: int,
        tokens: bool,
        decode: str = "cpu",
        online: Any = None,
    ) -> None:
        self.lazy, self.plan, self.source_index = lazy, plan, source_index
        self.student_size, self.tokens, self.decode = int(student_size), bool(tokens), decode
        self.online = online

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, step: int) -> dict[str, Any]:
        rows, views = self.plan.rows_views(int(step))
        out = {"cls": None, "tokens": None, "rows": torch.as_tensor(rows), "step": int(step)}
        e, fresh = self.plan.epoch, None if self.online is None else self.online.fresh(self.plan, int(step))
        if self.lazy.store_url is None:  # online: every view fresh
            return self._replay(
                out, rows, lambda i, w, h: self.online.params(rows[i], e, views[i], w, h), fresh=fresh
            )
        t = read_targets(self.lazy.reader, rows, views, self.tokens, keep_int8=True)
        out["cls"], out["tokens"], out["token_scale"] = t["cls"], t["tokens"], t.get("token_scale")
        stored = t["params"].numpy().reshape(len(rows), views.shape[1], -1)
        if fresh is None:
            return self._replay(out, rows, lambda i, w, h: stored[i])

        def params_of(i: int, w: int, h: int) -> np.ndarray:  # --refresh: fresh params in the fresh slots
            p, j = stored[i].copy(), np.flatnonzero(fresh[i])
            p[j] = self.online.params(rows[i], e, j, w, h) if len(j) else p[j]
            return p

        return self._replay(out, rows, params_of, fresh=fresh)

    def _replay(
        self, out: dict[str, Any], rows: np.ndarray, params_of: Any, source: Any = None, fresh: Any = None
    ) -> dict[str, Any]:
        """Read each row's image (from ``source``, default the run's) and replay its views;
        ``params_of(i, width, height)`` -> f32 [R, P]; ``fresh`` bool [n, R]: views also replayed at the
        teacher's size ("teacher_images") and flagged in "fresh" [n*R] (online: all; --refresh: F of them)."""
        encoded, images, teacher_images, params = [], [], [], []
        source = self.lazy.source if source is None else source
        for i, row in enumerate(rows):
            sample = worker_read(source, int(self.source_index[int(row)]), self.decode)
            if isinstance(sample, Encoded):  # bytes mode: device_images decodes and replays
                encoded.append(sample)
                params.append(params_of(i, max(sample.width, 1), max(sample.height, 1)))
                continue
            p = params_of(i, *sample.image.size)
            params.append(p)
            images.extend(replay_view(sample.image, view, self.student_size) for view in p)
            if fresh is not None:
                size = self.online.teacher_size
                teacher_images.extend(replay_view(sample.image, v, size) for v in p[fresh[i]])
        out["params"] = torch.from_numpy(np.ascontiguousarray(np.concatenate(params), dtype=np.float32))
        out["fresh"] = None if fresh is None else torch.from_numpy(np.ascontiguousarray(fresh).reshape(-1))
        if encoded:
            return {**out, "images": None, "encoded": pack(encoded)}
        out["teacher_images"] = torch.stack(teacher_images) if teacher_images else None
        return {**out, "images": torch.stack(images)}


class StepSampler(torch.utils.data.Sampler):
    """Yields step indices ``start, start+1, ..., steps-1`` (resume restores the data position)."""

    def __init__(self, start: int, steps: int) -> None:
        self.start, self.steps = int(start), int(steps)

    def __iter__(self):
        return iter(range(self.start, self.steps))

    def __len__(self) -> int:
        return max(self.steps - self.start, 0)


def collate_batch(items: list[dict[str, Any]]) -> dict[str, Any]:
    """The DataLoader yields whole batches (one item per step): unwrap the single item."""
    return items[0]
