"""Stage 2 from a streamed store: whole shard files, once per epoch per rank (:mod:`cospress.store.stream`).

:func:`choose_reader` picks the stream or the random-access reader (``--reader``); :class:`StreamBatches`
yields the batches of one lane (one loader worker) in the order of a
:class:`~cospress.store.stream.StreamOrder`: the same items as :class:`~cospress.distill.data.DistillBatches`
(targets, replayed views, ``step``), so the loop, prefetch and resume are the same. Global step k of
a rank is batch ``k // lanes`` of lane ``k % lanes``; a resumed run starts each lane at its first
batch at or after the recorded position, without fetching the shards it skips. The order depends on
(seed, epoch, world, workers, stream buffer): resume with the same ones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cospress import netio
from cospress.distill.data import DistillBatches, TrainData, choose_views
from cospress.errors import ConfigError
from cospress.runtime import DistContext
from cospress.store.row_order import SHUFFLED, store_row_order
from cospress.store.stream import StreamOrder, StreamReader, gather, lane_batches

log = logging.getLogger(__name__)

LARGE_LOCAL_BYTES = 16 * 2**30  # a local store larger than this streams: it may not fit the page cache


@dataclass
class StreamSetup:
    """What every process needs to stream: the fetcher, the shape of the order, the token codec."""

    reader: StreamReader
    lanes: int
    buffer: int
    depth: int
    codec: str
    projection: Any = None
    image_ranges: bool = False  # wds source: a store shard's images fetched as one byte range per tar
    view_map: Any = None  # a store with view extensions: view -> (part, view in that part)


def choose_reader(cfg: Any, store: Any) -> tuple[str, str]:
    """("stream" | "random", why) for ``cfg.reader`` and a :class:`~cospress.store.reader.StoreReader`."""
    from cospress.store.remote import is_local

    if cfg.reader != "auto":
        return cfg.reader, f"--reader {cfg.reader}"
    if not is_local(str(cfg.store)):
        if cfg.cache_dir:  # the user asked for a local copy: whole shard files fetched once, then local reads
            return "random", "auto: a URL store read through --cache-dir"
        return "stream", "auto: the store is read from a URL"
    size = store.layout.estimate_bytes()
    if size > LARGE_LOCAL_BYTES:
        return "stream", f"auto: the local store holds ~{size / 2**30:.0f} GiB"
    return "random", f"auto: a local store of ~{size / 2**20:.0f} MiB"


def attach_stream(data: TrainData, cfg: Any, world: int) -> TrainData:
    """Set ``data.stream`` (and the steps per epoch) when the stream reader is chosen; logs the choice."""
    store = data.reader
    mode, why = choose_reader(cfg, store)
    lanes = max(1, int(cfg.workers))
    if mode == "stream":
        order = _order(data, cfg, world, rank=0, epoch=0, lanes=lanes)
        if len(order) == 0:
            need = f"{store.num_shards} shards cannot give every one of {world} rank(s) x {lanes} worker(s) a batch"
            if cfg.reader == "stream":
                raise ConfigError(f"--reader stream: {need}; use fewer workers or --reader random")
            mode, why = "random", f"auto: {need}"
    if mode == "random":
        log.info("store reader: random access (%s)", why)
        return data
    names = ["cls", "views"]
    if data.use_tokens:
        names += ["tokens", "token_scale"] if store.layout.token_codec != "fp16" else ["tokens"]
    exts = list(getattr(store, "extensions", None) or [])
    parts = ("", *(e.path for e in exts))  # view extensions: their shard s holds the same rows
    reader = StreamReader(str(cfg.store), tuple(names), store.storage_options, parts)
    reader.layouts  # noqa: B018 - refuse codecs it cannot read now, in one line, not in a worker
    codec = store.layout.token_codec
    data.stream = StreamSetup(reader, lanes, int(cfg.stream_buffer), int(cfg.stream_prefetch), codec,
                              store.projection if codec == "pca" and data.use_tokens else None,
                              view_map=store._view_map if exts else None)  # fmt: skip
    data.steps_per_epoch = len(order)
    data.stream.image_ranges = hasattr(data.lazy.source, "image_members")
    images = "one byte range per tar per store shard" if data.stream.image_ranges else "read one by one"
    log.info(
        "store reader: stream (%s): whole shard files, buffer %d shard(s), prefetch %d shard(s) per worker, "
        "%d lane(s); %d steps per epoch; images %s", why, data.stream.buffer, data.stream.depth, lanes, len(order),
        images,
    )  # fmt: skip
    unmixed = unmixed_shards(
        data.labels, store.shard_size, data.stream.buffer, store_row_order(store.manifest)
    )
    if unmixed:
        log.warning(unmixed)
    return data


def unmixed_shards(labels: np.ndarray, shard_size: int, buffer: int, row_order: str) -> str | None:
    """One warning line when streamed batches would see few classes: a store in source order (a class
    folder lists its images class by class) whose shards each hold few of its classes."""
    labels = np.asarray(labels)
    classes = np.unique(labels[labels >= 0])
    shards = -(-len(labels) // max(1, shard_size))
    if row_order == SHUFFLED or len(classes) < 2 or shards < 2:
        return None
    picked = np.unique(np.linspace(0, shards - 1, min(shards, 256)).astype(np.int64))  # a sample of shards
    per = [np.unique(s[s >= 0]).size for s in (labels[i * shard_size : (i + 1) * shard_size] for i in picked)]
    mixed = min(len(classes), float(np.mean(per)) * buffer)
    if mixed >= len(classes) / 2:
        return None
    return (
        f"the store's rows are in source order and a shard holds {np.mean(per):.1f} of its {len(classes)} "
        f"classes on average: a streamed batch mixes ~{mixed:.0f} (a buffer of {buffer} shard(s)), which costs "
        "quality (docs/performance.md); re-extract with --row-order shuffled, raise --stream-buffer, or use "
        "--reader random"
    )


def check_stream_resume(data: TrainData, cfg: Any, state: dict[str, Any] | None) -> None:
    """Refuse to resume a streamed run mid-epoch with settings that reshape the rest of its epoch
    (``--workers``: one lane each; ``--stream-buffer``; ``--reader``): rows would repeat or be skipped."""
    if state is None or int(state.get("position", 0)) == 0:
        return
    was = state.get("config") or {}
    keys = ("reader", "workers", "stream_buffer") if data.stream is not None else ("reader",)
    diff = [
        f"--{k.replace('_', '-')} {was[k]} -> {getattr(cfg, k)}"
        for k in keys
        if k in was and was[k] != getattr(cfg, k)
    ]
    if diff:
        raise ConfigError(
            f"resuming in the middle of an epoch with {', '.join(diff)} would change the order of the rest of "
            "the epoch (the stream reader's order depends on them): resume with the checkpoint's settings"
        )


def _order(data: TrainData, cfg: Any, world: int, rank: int, epoch: int, lanes: int) -> StreamOrder:
    store = data.reader
    return StreamOrder(
        train_rows=data.split.train,
        shard_size=store.shard_size,
        num_shards=store.num_shards,
        seed=cfg.seed,
        epoch=epoch,
        batch=cfg.batch_size // cfg.views_per_image // world,
        world=world,
        rank=rank,
        lanes=lanes,
        buffer=int(cfg.stream_buffer),
    )


def stream_loader(
    data: TrainData, cfg: Any, ctx: DistContext, epoch: int, position: int, decode: str
) -> tuple[StreamOrder, torch.utils.data.DataLoader]:
    """This rank's stream order for ``epoch`` (``len`` = steps) and a loader of its batches from
    ``position`` on (one worker per lane)."""
    s = data.stream
    order = _order(data, cfg, ctx.world, ctx.rank, epoch, s.lanes)
    batches = StreamBatches(data, s, order, position, cfg.views_per_image, cfg.student_size, decode)
    loader = torch.utils.data.DataLoader(
        batches,
        batch_size=None,
        collate_fn=_as_is,
        num_workers=cfg.workers,
        pin_memory=ctx.device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch),  # never draws the global RNG
    )
    return order, loader


def _as_is(item: dict[str, Any]) -> dict[str, Any]:
    return item


class StreamBatches(torch.utils.data.IterableDataset):
    """The batches of a rank's epoch from ``position`` on: lane ``(position + w) % lanes`` in
    worker w, so the loader's round-robin over its workers yields the steps in order."""

    def __init__(
        self,
        data: TrainData,
        setup: StreamSetup,
        order: StreamOrder,
        position: int,
        views: int,
        size: int,
        decode: str,
    ) -> None:
        self.setup, self.order, self.position, self.views = setup, order, int(position), int(views)
        self.stored_views = data.reader.stored_views
        self.replay = DistillBatches(data.lazy, None, data.source_index, size, data.use_tokens, decode)
        self.lazy, self.source_index = data.lazy, data.source_index

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        if info is None and self.order.lanes != 1:
            raise ConfigError("a stream of several lanes needs one loader worker per lane")
        worker = 0 if info is None else info.id
        lane = (self.position + worker) % self.order.lanes
        start = self.order.first_batch(lane, self.position)
        ranges = (
            ImageRanges(self.lazy.source, self.source_index, self.order) if self.setup.image_ranges else None
        )
        self.source = ranges.source if ranges else self.lazy.source
        s = self.setup
        for j, rows, held in lane_batches(self.order, lane, start, s.reader, s.depth, ranges):
            if ranges is not None:
                ranges.hold(held)
            yield self._batch(j * self.order.lanes + lane, rows, held)

    def _batch(self, step: int, rows: np.ndarray, held: dict) -> dict[str, Any]:
        o = self.order
        views = np.stack([choose_views(o.seed, o.epoch, int(r), self.stored_views, self.views) for r in rows])
        got = gather(held, o.shard_size, rows, views, self.setup.view_map)
        out: dict[str, Any] = {"rows": torch.as_tensor(rows), "step": int(step)}
        out.update(_targets(got, self.setup))
        stored = got["views"].astype(np.float32)
        return self.replay._replay(out, rows, lambda i, w, h: stored[i], self.source)


class ImageRanges:
    """The images of a store shard's rows fetched as one byte range per tar (``wds:`` sources).

    A wds: source's rows are in source order (stage 1's ``--row-order auto``), so the images of a store
    shard lie in one contiguous run of one or two tars: fetched with the shard's files, in the prefetch thread,
    one GET per tar instead of one read per image. A tar whose wanted images are scattered (a store of
    a subset, an appended store: the range would be > 4x their bytes) is left to per-image reads.
    ``source`` serves the held bytes and falls back to the source's own reads.
    """

    def __init__(self, source: Any, source_index: np.ndarray, order: StreamOrder) -> None:
        import copy

        self.base, self.source_index, self.order = source, source_index, order
        self.images: dict[int, bytes] = {}
        self.source = copy.copy(source)  # shares the index arrays; its reads are served from memory
        self.source.read_bytes = self._read_bytes
        self._fs: dict[str, Any] = {}

    def _read_bytes(self, i: int) -> bytes | None:
        data = self.images.get(int(i))
        return bytes(data) if data is not None else type(self.base).read_bytes(self.source, i)

    def hold(self, held: dict[int, dict[str, Any]]) -> None:
        """Serve the images of the held shards (the others are let go)."""
        self.images = {p: b for files in held.values() for p, b in (files.get("extra") or {}).items()}

    def __call__(self, shard: int) -> dict[int, memoryview]:
        o = self.order
        rows = o.train_rows[np.searchsorted(o.train_rows, shard * o.shard_size) :
                            np.searchsorted(o.train_rows, (shard + 1) * o.shard_size)]  # fmt: skip
        pos = self.source_index[rows]
        tar, off, size = self.base.image_members(pos)
        out: dict[int, memoryview] = {}
        for t in np.unique(tar[off >= 0]):
            m = (tar == t) & (off >= 0)
            lo, hi = int(off[m].min()), int((off[m] + size[m]).max())
            if hi - lo > 4 * int(size[m].sum()) + 2**20:
                continue
            blob = memoryview(self._range(self.base.shards[int(t)], lo, hi))
            out.update(
                {
                    int(p): blob[int(a) - lo : int(a) - lo + int(z)]
                    for p, a, z in zip(pos[m], off[m], size[m], strict=True)
                }
            )
        return out

    def _range(self, url: str, start: int, stop: int) -> bytes:
        if "://" not in url or url.startswith("file://"):
            with open(url.removeprefix("file://"), "rb") as f:
                f.seek(start)
                return f.read(stop - start)
        import fsspec

        if url not in self._fs:
            self._fs[url] = fsspec.core.url_to_fs(url, skip_instance_cache=True)
        fs, path = self._fs[url]
        return netio.retry(lambda: fs.cat_file(path, start=start, end=stop), f"{url} bytes {start}-{stop}")


def stream_feature_batches(data: TrainData, cfg: Any) -> tuple[Any, int]:
    """compressor_first over a streamed store: (epoch -> batches of CLS and decoded tokens, steps per
    epoch) in the stream order of one lane (every rank runs the same fit), from whole shard files."""
    from cospress.store.codecs import decode_tokens

    s, stored = data.stream, data.reader.stored_views

    def batches_of(epoch: int):
        order = _order(data, cfg, world=1, rank=0, epoch=epoch, lanes=1)
        for _, rows, held in lane_batches(order, 0, 0, s.reader, s.depth):
            views = np.stack(
                [choose_views(cfg.seed, epoch, int(r), stored, cfg.views_per_image) for r in rows]
            )
            got = gather(held, order.shard_size, rows, views, s.view_map)
            tokens = got.get("tokens")
            if tokens is not None:  # float16 whatever the codec, as read_targets gives them
                tokens = _flat(decode_tokens(s.codec, tokens, got.get("token_scale"), s.projection))
            yield {"cls": _flat(got["cls"]), "tokens": tokens}

    return batches_of, len(_order(data, cfg, world=1, rank=0, epoch=0, lanes=1))


def _flat(a: np.ndarray) -> torch.Tensor:
    """[n, R, ...] -> [n*R, ...] (image-major, as read_targets flattens)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.reshape(-1, *t.shape[2:])


def _targets(got: dict[str, np.ndarray], setup: StreamSetup) -> dict[str, Any]:
    """cls / tokens / token_scale as :func:`~cospress.distill.data.read_targets` gives them
    (``keep_int8``: int8 tokens stay raw with their scale; pca tokens are decoded)."""
    from cospress.store.codecs import decode_tokens

    out = {"cls": _flat(got["cls"]), "tokens": None, "token_scale": None}
    if "tokens" not in got:
        return out
    if setup.codec == "pca":
        out["tokens"] = _flat(decode_tokens("pca", got["tokens"], got["token_scale"], setup.projection))
        return out
    out["tokens"] = _flat(got["tokens"])
    if setup.codec == "int8":
        out["token_scale"] = _flat(got["token_scale"])
    return out
