"""Stage 1 reader: each store row's image with its stored views, in batches that never straddle a shard.

Teacher batches always hold the same images whatever was already committed, so a resumed run
computes bitwise the same features as an uninterrupted one (same machine, CPU).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cospress.data.device_decode import Encoded, worker_read
from cospress.data.sources import Source
from cospress.data.views import ViewPolicy, center_view_params, replay_view, sample_view_params
from cospress.errors import BadImageError
from cospress.netio import io_skip
from cospress.store.records import read_record

log = logging.getLogger(__name__)


class ViewDataset(Dataset):
    """Row -> the image's stored views, replayed at the teacher's resolution (decoded in workers).

    An item is a dict: ``row``; ``params`` float32 [V, P] (the view params of the V stored views);
    ``images`` uint8 [V, 3, size, size], or None with ``reason`` set for an unreadable image, or
    None with ``encoded`` (the image's bytes) in bytes mode, decoded and replayed on the device.
    """

    def __init__(
        self,
        source: Source,
        policy: ViewPolicy,
        seed: int,
        views: int,
        center: bool,
        size: int,
        max_pixels: int,
        positions: np.ndarray | None = None,
        decode: str = "cpu",
        first_view: int = 0,
    ) -> None:
        self.decode, self.first_view = decode, first_view  # first_view: --add-views (views K..K+N-1)
        self.source, self.policy, self.seed = source, policy, seed
        self.views, self.center, self.size, self.max_pixels = views, center, size, max_pixels
        self.keys = source.keys()
        self.positions = positions  # store row -> source index (--append); None: the same

    def __len__(self) -> int:
        return len(self.keys) if self.positions is None else len(self.positions)

    def _params(self, key: str, width: int, height: int) -> np.ndarray:
        """float32 [V, P]: the K seeded views (+ the centre view) of one image."""
        params = [
            sample_view_params(self.policy, self.seed, key, v, width, height)
            for v in range(self.first_view, self.first_view + self.views)
        ]
        if self.center:
            params.append(center_view_params(width, height, self.policy.version))
        return np.stack(params).astype(np.float32)

    def _skipped(self, row: int, reason: str) -> dict[str, Any]:
        stored_views = self.views + int(self.center)
        return {
            "row": row,
            "images": None,
            "params": np.zeros((stored_views, self.policy.num_params), np.float32),
            "reason": reason,
        }

    def __getitem__(self, row: int) -> dict[str, Any]:
        i = row if self.positions is None else int(self.positions[row])
        key = self.keys[i]
        try:
            sample = worker_read(self.source, i, self.decode, self.max_pixels)
        except BadImageError as e:
            return self._skipped(row, str(e))
        if isinstance(sample, Encoded):  # bytes mode: decode + replay happen in the main process
            if sample.error:
                return self._skipped(row, sample.error)
            params = self._params(key, sample.width, sample.height)
            return {"row": row, "images": None, "encoded": sample, "params": params, "reason": None}
        params = self._params(key, *sample.image.size)
        images = torch.stack([replay_view(sample.image, p, self.size) for p in params])
        return {"row": row, "images": images, "params": params, "reason": None}


def _collate(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items


def shard_batches(
    shards: list[int], shard_rows: Callable[[int], tuple[int, int]], images_per_batch: int
) -> Iterator[list[int]]:
    """Row batches aligned to shard starts: a batch never straddles two shards."""
    for s in shards:
        start, stop = shard_rows(s)
        for b in range(start, stop, images_per_batch):
            yield list(range(b, min(b + images_per_batch, stop)))


def view_loader(dataset: ViewDataset, batches: list[list[int]], workers: int, pin_memory: bool) -> DataLoader:
    """A loader of ``batches`` (lists of rows); each batch is the list of its items."""
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers > 0 else None,
    )


def io_skipped_shards(writer: Any, committed: set[int]) -> set[int]:
    """The committed shards whose commit records a skip that was a read failure, not a bad image
    (`cospress.netio.io_skip`; an older cospress recorded those): a rerun writes them again. Shards
    published in the manifest of an append are kept."""
    redo = set()
    for shard in sorted(committed):
        if shard < writer.protected_shards:
            continue
        try:
            commit = read_record(writer.path, writer.paths.commit(shard))
        except (OSError, ValueError):
            continue
        if any(io_skip(str(s.get("reason", ""))) for s in commit.get("skipped") or []):
            redo.add(shard)
    if redo:
        log.warning(
            "%d committed shard(s) hold images skipped for a read failure, not a bad image: extracting them again",
            len(redo),
        )
    return redo
