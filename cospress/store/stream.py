"""Stream a store shard by shard: stage 2 from a bucket, at any number of rows.

The random-access reader (:class:`~cospress.store.reader.StoreReader`) fetches one inner chunk per
(row, view): right for a small local store, one request per chunk over a network. The stream
reader fetches each array's shard file whole (one GET), once per epoch per rank, and decodes the
rows it needs from memory with the same shard decoding (:class:`~cospress.store.shardio.ShardBlob`).

The order of an epoch (:class:`StreamOrder`) is a pure function of (seed, epoch, world, rank,
lanes, buffer, batch), so a resumed run skips to its recorded position without reading what it
skips:

1. the shards are permuted by (seed, epoch); shard i of the permutation goes to the unit
   ``i % (world * lanes)`` (unit = one lane of one rank; a lane is one loader worker);
2. a lane's shards are taken ``buffer`` at a time (a window); the training rows of a window are
   permuted by (seed, epoch, the window's first shard), and a lane's row sequence is its windows'
   rows one window after another, cut into batches of ``batch`` rows (a batch may span two windows);
3. every lane yields the same number of batches in every epoch (the least any lane can hold under
   any permutation), so every rank runs the same steps and the schedule is fixed: a lane's surplus
   rows (at most about one shard) are left out of that epoch, different ones each epoch.

Global step k of a rank is batch ``k // lanes`` of lane ``k % lanes``. Memory held per lane: the
shard files of at most two windows plus ``depth`` prefetched shards, whatever the row count.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from cospress import netio
from cospress.errors import ConfigError, CospressError, StoreError
from cospress.store import manifest as mf
from cospress.store.shardio import ShardBlob, ShardLayout
from cospress.utils import redact_text, redact_url

__all__ = ["StreamOrder", "StreamReader", "shard_order", "lane_batches"]

ROW_ARRAYS = ("cls", "views", "tokens", "token_scale")


def shard_order(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    """The shards of an epoch in reading order (all ranks draw the same permutation)."""
    return np.random.default_rng([int(seed), int(epoch), 0x5A4D]).permutation(int(num_shards))


@dataclass(frozen=True)
class StreamOrder:
    """The batches of one epoch for one rank, as rows: see the module docstring.

    ``train_rows`` sorted int64 row indices used for training; ``batch`` rows (images) per step of
    this rank; ``lanes`` loader lanes (max(1, workers)); ``buffer`` shards per shuffle window.
    """

    train_rows: np.ndarray
    shard_size: int
    num_shards: int
    seed: int
    epoch: int
    batch: int
    world: int = 1
    rank: int = 0
    lanes: int = 1
    buffer: int = 4

    def __post_init__(self) -> None:
        if self.batch < 1 or self.lanes < 1 or self.buffer < 1:
            raise ConfigError("stream batch, lanes and buffer must be >= 1")
        counts = np.bincount(self.train_rows // self.shard_size, minlength=self.num_shards)
        object.__setattr__(self, "counts", counts.astype(np.int64))

    @property
    def units(self) -> int:
        return self.world * self.lanes

    def lane_batches_per_epoch(self) -> int:
        """Batches every lane yields: the least rows any lane can get (the smallest shards), // batch."""
        per_unit = self.num_shards // self.units
        least = int(np.sort(self.counts)[:per_unit].sum())
        return least // self.batch

    def __len__(self) -> int:
        """Steps of this rank in the epoch (the same on every rank and in every epoch)."""
        return self.lanes * self.lane_batches_per_epoch()

    def lane_shards(self, lane: int) -> np.ndarray:
        unit = lane * self.world + self.rank
        return shard_order(self.num_shards, self.seed, self.epoch)[unit :: self.units]

    def windows(self, lane: int) -> list[np.ndarray]:
        shards = self.lane_shards(lane)
        return [shards[i : i + self.buffer] for i in range(0, len(shards), self.buffer)]

    def window_rows(self, window: np.ndarray) -> np.ndarray:
        """The training rows of a window's shards, in their shuffled order."""
        s = self.shard_size
        parts = [
            self.train_rows[
                np.searchsorted(self.train_rows, a * s) : np.searchsorted(self.train_rows, (a + 1) * s)
            ]
            for a in window
        ]
        rows = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        rng = np.random.default_rng([int(self.seed), int(self.epoch), 0xB0F, int(window[0])])
        return rows[rng.permutation(len(rows))]

    def lane_of(self, step: int) -> tuple[int, int]:
        """(lane, batch of that lane) of global step ``step``."""
        return step % self.lanes, step // self.lanes

    def first_batch(self, lane: int, position: int) -> int:
        """The first batch of ``lane`` at or after global step ``position``."""
        return -(-(position - lane) // self.lanes) if position > lane else 0


class StreamReader:
    """Fetches whole shard files of the row arrays (cls, views, tokens, token_scale) of a store.

    Picklable: each process opens its own filesystem on first use. ``arrays``: the arrays to fetch;
    ``parts``: the store ("") and its view extensions (their folders), each fetched shard by shard.
    """

    def __init__(
        self,
        url: str,
        arrays: tuple[str, ...],
        storage_options: dict | None = None,
        parts: tuple[str, ...] = ("",),
    ) -> None:
        self.url, self.arrays, self.parts = str(url), tuple(arrays), tuple(parts)
        self.storage_options = dict(storage_options or {})
        self.display = redact_url(self.url)
        self._fs: Any = None
        self._pid = os.getpid()
        self._layouts: dict[str, ShardLayout] | None = None
        self.gets = 0  # shard files fetched by this process (for benchmarks and tests)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fs": None}

    def _open(self) -> None:
        import fsspec

        if "://" in self.url:
            self._fs, root = fsspec.core.url_to_fs(self.url, skip_instance_cache=True, **self.storage_options)
        else:
            self._fs, root = fsspec.filesystem("file"), self.url
        self._pid = os.getpid()
        self._root = str(root).rstrip("/")

    def _cat(self, key: str) -> bytes:
        if self._fs is None or self._pid != os.getpid():  # a forked worker opens its own
            self._open()
        try:
            fetch = lambda: self._fs.cat_file(f"{self._root}/{key}", start=0)  # noqa: E731  start: no size request
            return fetch() if "://" not in self.url else netio.retry(fetch, f"{key} of {self.display}")
        except CospressError:  # NetworkError after the retries (cospress.netio): one line already
            raise
        except FileNotFoundError:
            raise StoreError(f"{self.display}/{key} is missing; run `cospress verify` on the store") from None
        except Exception as e:  # network errors may quote a signed URL: never show it
            raise StoreError(
                f"cannot read {self.display}/{key}: {redact_text(f'{type(e).__name__}: {e}')}; "
                "check the URL, the network and the credentials"
            ) from None

    @property
    def layouts(self) -> dict[str, ShardLayout]:
        """Each array's shard layout (``part/name``, or ``name`` for the store itself), from its
        zarr.json (read once per process)."""
        if self._layouts is None:
            self._layouts = {_key(p, n): self._layout(_key(p, n)) for p in self.parts for n in self.arrays}
        return self._layouts

    def _layout(self, name: str) -> ShardLayout:
        lay = ShardLayout.from_metadata(json.loads(self._cat(f"{name}/zarr.json")))
        lead = 2 if name.rsplit("/", 1)[-1] in ("tokens", "token_scale") else 1
        if lay is None or lay.chunk[lead:] != lay.shard[lead:] or any(c != 1 for c in lay.chunk[:lead]):
            raise StoreError(
                f"{self.display}: array {name} has codecs or chunks the stream reader does not read"
            )
        return lay

    def fetch(self, shard: int, extra: Callable[[int], Any] | None = None) -> dict[str, Any]:
        """Every array's shard file of ``shard``, one GET each; ``extra(shard)`` under "extra" (what
        else a caller fetches with a shard, e.g. its images)."""
        out: dict[str, Any] = {} if extra is None else {"extra": extra(int(shard))}
        parts: list[dict[str, ShardBlob]] = [{} for _ in self.parts]
        for i, part in enumerate(self.parts):
            for name in self.arrays:
                lay = self.layouts[_key(part, name)]
                key = mf.shard_file_key(_key(part, name), int(shard), len(lay.shape))
                parts[i][name] = ShardBlob(self._cat(key), lay, f"{self.display}/{key}")
                self.gets += 1
        out.update(parts[0])
        if len(parts) > 1:
            out["parts"] = parts
        return out

    def prefetched(
        self, shards: list[int], depth: int, extra: Callable[[int], Any] | None = None
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """(shard, its files) for ``shards`` in order, fetched by a thread at most ``depth`` shards
        ahead (the bytes in flight are bounded). An error is raised when its shard is reached."""
        q: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
        stop = threading.Event()

        def work() -> None:
            for s in shards:
                try:
                    item: Any = (s, self.fetch(s, extra))
                except BaseException as e:  # handed to the consumer, raised there
                    item = e
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set() or isinstance(item, BaseException):
                    return

        thread = threading.Thread(target=work, daemon=True, name="cospress-stream-fetch")
        thread.start()
        try:
            for _ in shards:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()


def lane_batches(
    order: StreamOrder,
    lane: int,
    start: int,
    reader: StreamReader,
    depth: int = 2,
    extra: Callable[[int], Any] | None = None,
) -> Iterator[tuple[int, np.ndarray, dict[int, dict[str, Any]]]]:
    """(batch index in the lane, rows [batch], shard -> its files) for the lane's batches ``start`` on.

    Windows before the one that holds batch ``start`` are never fetched; a window's files are let
    go once its last row has been yielded.
    """
    stop = order.lane_batches_per_epoch()
    if start >= stop:
        return
    windows = order.windows(lane)
    cum = np.concatenate([[0], np.cumsum([int(order.counts[w].sum()) for w in windows])])
    n = order.batch
    first = int(np.searchsorted(cum, start * n, side="right") - 1)
    last = int(np.searchsorted(cum, stop * n - 1, side="right") - 1)
    files = reader.prefetched([int(s) for w in windows[first : last + 1] for s in w], depth, extra)
    held: dict[int, dict[str, ShardBlob]] = {}
    rows_of: dict[int, np.ndarray] = {}  # window -> its shuffled rows, while its files are held
    loaded = first - 1  # the last window whose files are held
    try:
        for j in range(start, stop):
            lo, hi = j * n, (j + 1) * n
            while loaded < int(np.searchsorted(cum, hi - 1, side="right") - 1):
                loaded += 1
                rows_of[loaded] = order.window_rows(windows[loaded])
                for _ in windows[loaded]:
                    s, blobs = next(files)
                    held[s] = blobs
            w_lo = int(np.searchsorted(cum, lo, side="right") - 1)
            for w in [w for w in rows_of if w < w_lo]:  # windows wholly consumed
                del rows_of[w]
                for s in windows[w]:
                    held.pop(int(s), None)
            rows = np.concatenate(
                [rows_of[w][max(lo - cum[w], 0) : max(hi - cum[w], 0)] for w in sorted(rows_of)]
            )
            yield j, rows, held
    finally:
        files.close()


def _key(part: str, name: str) -> str:
    return f"{part}/{name}" if part else name


def gather(
    held: dict[int, dict[str, Any]],
    shard_size: int,
    rows: np.ndarray,
    views: np.ndarray,
    view_map: Any = None,
) -> dict:
    """The row arrays of ``rows`` [n] x ``views`` [n, R] from held shard files, as stored (tokens
    raw): cls [n, R, D], views [n, R, P], tokens [n, R, T, d] and token_scale [n, R, T] when fetched.
    ``view_map`` [V, 2] (a store with view extensions): view -> (part, view in that part)."""
    out: dict[str, Any] = {}
    first = held[int(rows[0]) // shard_size] if len(rows) else {}
    for name in [n for n in first if n in ROW_ARRAYS]:
        per_row = []
        for row, vs in zip(rows, views, strict=True):
            files, local = held[int(row) // shard_size], int(row) % shard_size
            where = [
                (0, int(v)) if view_map is None else (int(view_map[v][0]), int(view_map[v][1])) for v in vs
            ]
            blobs = [files[name] if p == 0 else files["parts"][p][name] for p, _ in where]
            if name in ("cls", "views"):
                per_row.append(
                    np.stack([b.read((local,))[v] for b, (_, v) in zip(blobs, where, strict=True)])
                )
            else:
                per_row.append(np.stack([b.read((local, v)) for b, (_, v) in zip(blobs, where, strict=True)]))
        out[name] = np.stack(per_row)
    return out
