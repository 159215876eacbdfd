"""Stage 1 runner: K augmented views of every image -> teacher -> a sharded Zarr v3 store.

The work is a list of independent shard ids. Each rank (torchrun) owns the shards ``s`` with
``s % world_size == rank``; a finished shard is written in one piece and committed atomically, so
rerunning the same command skips committed shards and completes the rest. Teacher batches never
straddle a shard boundary and always hold the same images, so a resumed run computes bitwise the
same features as an uninterrupted one (same machine, CPU).
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cospress import __version__
from cospress.config import save_config, to_dict
from cospress.data.device_decode import decode_view_items, read_encoded, resolve_decode
from cospress.data.sources import Source, open_source
from cospress.data.views import PARAM_NAMES, ViewPolicy, center_view_params, replay_view, sample_view_params
from cospress.errors import BadImageError, StoreError
from cospress.extract.config import ExtractConfig
from cospress.models.teachers import build_teacher
from cospress.runtime import autocast, autocast_dtype, dist_info, pick_device, tune_malloc
from cospress.store import StoreWriter, estimate_store_bytes
from cospress.store.writer import open_append, plan_append
from cospress.utils import human_bytes

log = logging.getLogger(__name__)


class ViewDataset(Dataset):
    """Row -> the image's stored views, replayed at the teacher's resolution (decoded in workers)."""

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
    ) -> None:
        self.decode = decode
        self.source, self.policy, self.seed = source, policy, seed
        self.views, self.center, self.size, self.max_pixels = views, center, size, max_pixels
        self.keys = source.keys()
        self.positions = positions  # store row -> source index (--append); None: the same

    def __len__(self) -> int:
        return len(self.keys) if self.positions is None else len(self.positions)

    def _params(self, key: str, width: int, height: int) -> np.ndarray:
        """float32 [V, P]: the K seeded views (+ the centre view) of one image."""
        params = [
            sample_view_params(self.policy, self.seed, key, v, width, height) for v in range(self.views)
        ]
        if self.center:
            params.append(center_view_params(width, height))
        return np.stack(params).astype(np.float32)

    def _skipped(self, row: int, reason: str) -> dict[str, Any]:
        num_views = self.views + int(self.center)
        return {
            "row": row,
            "images": None,
            "params": np.zeros((num_views, len(PARAM_NAMES)), np.float32),
            "reason": reason,
        }

    def __getitem__(self, row: int) -> dict[str, Any]:
        i = row if self.positions is None else int(self.positions[row])
        key = self.keys[i]
        if self.decode == "device":  # bytes mode: decode + replay happen in the main process
            enc = read_encoded(self.source, i, self.max_pixels)
            if enc.error:
                return self._skipped(row, enc.error)
            params = self._params(key, enc.width, enc.height)
            return {"row": row, "images": None, "encoded": enc, "params": params, "reason": None}
        try:
            sample = self.source.load(i, max_pixels=self.max_pixels)
        except BadImageError as e:
            return self._skipped(row, str(e))
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


class _ShardBuffer:
    """Accumulates one shard's rows until every row has arrived."""

    def __init__(
        self,
        start: int,
        stop: int,
        num_views: int,
        dim: int,
        num_tokens: int,
        tokens: bool,
        keys: list[str],
        labels: list[int],
    ) -> None:
        n = stop - start
        self.start, self.remaining = start, n
        self.cls = np.zeros((n, num_views, dim), np.float16)
        self.tokens = np.zeros((n, num_views, num_tokens, dim), np.float16) if tokens else None
        self.views = np.zeros((n, num_views, len(PARAM_NAMES)), np.float32)
        self.valid = np.zeros(n, np.uint8)
        self.keys = keys[start:stop]
        self.labels = np.asarray(labels[start:stop], np.int64)
        self.skipped: list[dict[str, str]] = []


class _Writer(threading.Thread):
    """Writes and commits finished shards in the background so the teacher keeps running."""

    def __init__(self, writer: StoreWriter) -> None:
        super().__init__(daemon=True, name="cospress-shard-writer")
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.seconds = 0.0

    def run(self) -> None:
        while (item := self.queue.get()) is not None:
            shard, buf = item
            if self.error is not None:
                continue
            t0 = time.perf_counter()
            try:
                self.writer.write_shard(
                    shard,
                    cls=buf.cls,
                    tokens=buf.tokens,
                    views=buf.views,
                    keys=buf.keys,
                    labels=buf.labels,
                    valid=buf.valid,
                    skipped=buf.skipped,
                )
            except BaseException as e:  # surfaced by the main thread
                self.error = e
            self.seconds += time.perf_counter() - t0

    def put(self, shard: int, buf: _ShardBuffer) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((shard, buf))

    def close(self) -> None:
        self.queue.put(None)
        self.join()
        if self.error is not None:
            raise self.error


def _check_free_disk(out: Path, need: int) -> None:
    probe = out if out.exists() else out.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise StoreError(
            f"not enough free disk for the store at {out}: needs up to {human_bytes(need)}, "
            f"{human_bytes(free)} free; use --no-tokens, fewer --views, --limit, or another --out"
        )


def _init_distributed(world: int, device: torch.device) -> bool:
    if world <= 1 or not torch.distributed.is_available():
        return False
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def _barrier(distributed: bool) -> None:
    if distributed:
        torch.distributed.barrier()


def run_extract(cfg: ExtractConfig, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Run stage 1 and return a summary (counts, timings, the manifest when this rank wrote it).

    ``progress(done_images, total_images)`` is called after every teacher batch of this rank.
    """
    tune_malloc()
    rank, world, local_rank = dist_info()
    device = pick_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    distributed = _init_distributed(world, device)
    try:
        return _extract(cfg, rank, world, device, distributed, progress)
    finally:
        if distributed:
            torch.distributed.destroy_process_group()


def _identity(cfg: ExtractConfig, teacher: Any, policy: ViewPolicy, source_info: dict, amp: Any) -> dict:
    """What makes two extractions the same run (a rerun into the store must match it)."""
    return {
        "teacher": teacher.describe(),
        "policy": {**policy.to_dict(), "fingerprint": policy.fingerprint()},
        "views": cfg.views,
        "center_view": cfg.center_view,
        "seed": cfg.seed,
        "source": source_info,
        "shard_size": cfg.shard_size,
        "tokens": cfg.tokens,
        "param_names": list(PARAM_NAMES),
        "precision": str(amp).replace("torch.", "") if amp else "float32",
    }


def _open_store(
    cfg: ExtractConfig, teacher: Any, source: Any, amp: Any, rank: int, distributed: bool
) -> tuple[StoreWriter, list[str], list[int], Any, int]:
    """Create (rank 0) or open (other ranks) the store; returns (writer, keys and labels per store
    row, the append plan or None, the estimated size in bytes)."""
    policy = cfg.policy()
    num_views = cfg.stored_views
    keys, labels = source.keys(), source.labels()
    source_info = source.describe()
    identity = _identity(cfg, teacher, policy, source_info, amp)
    out = Path(cfg.out)
    plan = None
    if cfg.append:
        layout = dict(shard_size=cfg.shard_size, num_views=num_views, dim=teacher.dim)
        layout.update(num_tokens=teacher.num_tokens, num_params=len(PARAM_NAMES), tokens=cfg.tokens)
        plan = plan_append(out, identity, keys, labels, source_info, **layout)
        keys, labels = plan.keys, plan.labels  # per row of the grown store
    estimate = estimate_store_bytes(
        len(keys), num_views, teacher.dim, teacher.num_tokens, len(PARAM_NAMES), cfg.tokens
    )
    if rank == 0:
        log.info(
            "store %s: %d images x %d views, teacher %s (dim %d, %d tokens) -> about %s before compression "
            "(float16 embeddings compress only ~1.15x)",
            out,
            len(keys),
            num_views,
            teacher.name,
            teacher.dim,
            teacher.num_tokens if cfg.tokens else 0,
            human_bytes(estimate),
        )
        if not (cfg.overwrite is False and (out / "manifest.json").exists()):
            _check_free_disk(out, estimate)
    open_kwargs = dict(
        num_rows=len(keys),
        shard_size=cfg.shard_size,
        num_views=num_views,
        dim=teacher.dim,
        num_tokens=teacher.num_tokens,
        num_params=len(PARAM_NAMES),
        tokens=cfg.tokens,
    )
    if rank == 0:
        if plan is not None:
            writer = open_append(plan)
        else:
            writer = StoreWriter.open(out, identity, overwrite=cfg.overwrite, create=True, **open_kwargs)
        save_config(cfg, out / "extract-config.yaml")
    _barrier(distributed)
    if rank != 0:
        ident = identity if plan is None else plan.identity
        writer = StoreWriter.open(out, ident, overwrite=False, create=False, **open_kwargs)
        writer.protected_shards = 0 if plan is None else plan.old_shards
    return writer, keys, labels, plan, estimate


@dataclass
class _Pass:
    """What one rank's pass over its pending shards did."""

    done: int = 0
    skipped: int = 0
    seconds: float = 0.0
    reading: float = 0.0
    teacher: float = 0.0
    writing: float = 0.0


def _run_teacher(
    cfg: ExtractConfig,
    loader: DataLoader,
    teacher: Any,
    writer: StoreWriter,
    keys: list[str],
    labels: list[int],
    device: torch.device,
    amp: Any,
    decode: str,
    total_images: int,
    progress: Callable[[int, int], None] | None,
) -> _Pass:
    """Run the teacher over the loader's batches, fill shard buffers and hand every finished shard
    to a background writer thread (so the teacher keeps running while it is compressed and written)."""
    num_views = cfg.stored_views
    size = teacher.input_size
    bg = _Writer(writer)
    bg.start()
    buffers: dict[int, _ShardBuffer] = {}
    res = _Pass()
    t_start = time.perf_counter()
    t0 = time.perf_counter()
    try:
        for items in loader:
            res.reading += time.perf_counter() - t0
            shard = items[0]["row"] // cfg.shard_size
            if shard not in buffers:
                start, stop = writer.shard_rows(shard)
                buffers[shard] = _ShardBuffer(
                    start, stop, num_views, teacher.dim, teacher.num_tokens, cfg.tokens, keys, labels
                )
            buf = buffers[shard]
            if decode == "device":
                decode_view_items(items, size, device)
            good = [it for it in items if it["images"] is not None]
            t1 = time.perf_counter()
            if good:
                x = torch.cat([it["images"] for it in good]).to(device, non_blocking=True)
                with torch.inference_mode(), autocast(device, amp):
                    feats = teacher(x)
                cls = feats.cls.to(torch.float16).reshape(len(good), num_views, -1).cpu().numpy()
                if cfg.tokens:
                    tok = feats.tokens.to(torch.float16).reshape(len(good), num_views, teacher.num_tokens, -1)
                    tok = tok.cpu().numpy()
            res.teacher += time.perf_counter() - t1
            g = 0
            for it in items:
                i = it["row"] - buf.start
                buf.views[i] = it["params"]
                if it["images"] is None:
                    buf.skipped.append({"key": keys[it["row"]], "reason": it["reason"]})
                    res.skipped += 1
                    log.warning("skipped %s: %s", keys[it["row"]], it["reason"])
                else:
                    buf.cls[i] = cls[g]
                    if cfg.tokens:
                        buf.tokens[i] = tok[g]
                    buf.valid[i] = 1
                    g += 1
            buf.remaining -= len(items)
            res.done += len(items)
            if buf.remaining == 0:
                bg.put(shard, buffers.pop(shard))
            if progress is not None:
                progress(res.done, total_images)
            t0 = time.perf_counter()
    finally:
        bg.close()
    res.seconds = time.perf_counter() - t_start
    res.writing = bg.seconds
    return res


def _extract(
    cfg: ExtractConfig,
    rank: int,
    world: int,
    device: torch.device,
    distributed: bool,
    progress: Callable[[int, int], None] | None,
) -> dict[str, Any]:
    source = open_source(cfg.data, limit=cfg.limit)
    teacher = build_teacher(cfg.teacher, weights=cfg.weights, image_size=cfg.image_size).to(device)
    if hasattr(teacher, "to_channels_last"):
        teacher.to_channels_last()
    amp = autocast_dtype(cfg.precision, device)
    writer, keys, labels, plan, estimate = _open_store(cfg, teacher, source, amp, rank, distributed)

    committed = writer.committed_shards()
    mine = [s for s in range(writer.num_shards) if s % world == rank]
    pending = [s for s in mine if s not in committed]
    if committed and rank == 0:
        log.info("resuming: %d of %d shards already committed", len(committed), writer.num_shards)
    total_images = sum(writer.shard_rows(s)[1] - writer.shard_rows(s)[0] for s in pending)

    positions = None if plan is None else plan.positions
    decode = resolve_decode(cfg.decode, device)
    dataset = ViewDataset(
        source, cfg.policy(), cfg.seed, cfg.views, cfg.center_view, teacher.input_size, cfg.max_pixels,
        positions, decode,
    )  # fmt: skip
    images_per_batch = max(1, cfg.batch_size // cfg.stored_views)
    loader = DataLoader(
        dataset,
        batch_sampler=list(shard_batches(pending, writer.shard_rows, images_per_batch)),
        num_workers=cfg.workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if cfg.workers > 0 else None,
    )
    res = _run_teacher(
        cfg, loader, teacher, writer, keys, labels, device, amp, decode, total_images, progress
    )
    _barrier(distributed)
    summary: dict[str, Any] = {
        "rank": rank,
        "world_size": world,
        "images": res.done,
        "skipped": res.skipped,
        "shards_written": len(pending),
        "shards_already_committed": len(mine) - len(pending),
        "seconds": res.seconds,
        "images_per_second": res.done / res.seconds if res.seconds > 0 else 0.0,
        "seconds_reading": res.reading,
        "seconds_teacher": res.teacher,
        "seconds_writing": res.writing,
        "store": str(Path(cfg.out)),
        "estimated_bytes": estimate,
    }
    if rank == 0:
        manifest = writer.finalize(
            extra={
                "config": to_dict(cfg),
                "cospress_version": __version__,
                "timings": {
                    k: summary[k]
                    for k in ("seconds", "seconds_reading", "seconds_teacher", "seconds_writing")
                },
            }
        )
        summary["manifest"] = manifest
        summary["skipped_total"] = len(manifest.get("skipped", []))
    _barrier(distributed)
    return summary


__all__ = ["ExtractConfig", "ViewDataset", "run_extract", "shard_batches"]
