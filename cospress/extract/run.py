"""Stage 1 runner: K augmented views of every image -> teacher -> a sharded Zarr v3 store.

The runner's loop reads batches (`cospress.extract.reader`: views of each row, in shard-aligned
batches), runs the teacher on them (`cospress.extract.teacher`, which knows no writer) and hands
their features to the writer (`cospress.extract.writer`: shard buffers filled, then written and
committed in the background). The work is a list of independent shard ids:
each rank (torchrun) owns the shards ``s`` with ``s % world_size == rank``; a finished shard is
written in one piece and committed atomically, so rerunning the same command skips committed
shards and completes the rest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from cospress.data.device_decode import resolve_decode
from cospress.data.sources import open_source
from cospress.extract.config import ExtractConfig
from cospress.extract.reader import ViewDataset, io_skipped_shards, shard_batches, view_loader
from cospress.extract.teacher import TeacherPass, load_teacher, run_teacher
from cospress.extract.writer import OpenedStore, ShardSink, open_store
from cospress.runtime import (
    DistContext,
    autocast_dtype,
    barrier,
    dtype_name,
    init_distributed,
    teardown_distributed,
    tune_malloc,
)
from cospress.store import StoreLayout, make_identity
from cospress.store.dest import Dest
from cospress.store.row_order import SHUFFLED, resolve_row_order, store_row_order

log = logging.getLogger(__name__)

_TIMINGS = ("seconds", "seconds_reading", "seconds_teacher", "seconds_writing")


def run_extract(cfg: ExtractConfig, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Run stage 1 and return a summary (counts, timings, the manifest when this rank wrote it).

    ``progress(done_images, total_images)`` is called after every teacher batch of this rank.
    """
    cfg.validate()  # the settings, once, before anything loads
    tune_malloc()
    extending = None
    if cfg.add_views:  # a view extension of the store --to (extract.extension)
        from cospress.extract.extension import prepare_extension

        cfg, extending = prepare_extension(cfg)
    ctx = init_distributed(cfg.device)
    try:
        return _extract(cfg, ctx, progress, extending)
    finally:
        if ctx.enabled:
            teardown_distributed()


def _extract(
    cfg: ExtractConfig, ctx: DistContext, progress: Callable[[int, int], None] | None, extending: Any = None
) -> dict:
    # the teacher, and what makes this run the same as another
    source = open_source(cfg.data, limit=cfg.limit)
    teacher = load_teacher(cfg, ctx.device)
    amp = autocast_dtype(cfg.precision, ctx.device)
    policy = cfg.policy()
    decode = resolve_decode(cfg.decode, ctx.device)
    identity = make_identity(
        teacher=teacher.describe(), view_policy=policy.to_dict(), policy_fingerprint=policy.fingerprint(),
        k=cfg.views, center_view=cfg.center_view, seed=cfg.seed, source=source.describe(),
        param_names=policy.param_names, precision=dtype_name(amp),
        decode=decode if decode == "cpu" else f"{decode}:{ctx.device.type}",
    )  # fmt: skip
    if not cfg.append and _row_order(cfg, source.kind) == SHUFFLED:
        identity["row_order"] = SHUFFLED  # an append keeps the store's order (`plan_append`)
    if extending is not None:
        extending.check(identity)
        identity["extension"] = extending.record()
    layout = StoreLayout(
        num_rows=len(source), shard_size=cfg.shard_size, stored_views=cfg.stored_views, dim=teacher.dim,
        num_tokens=teacher.num_tokens, num_params=policy.num_params, tokens=cfg.tokens,
    )  # fmt: skip
    store = open_store(cfg, identity, layout, source, teacher, ctx.is_main)  # + the token codec
    # the reader: this rank's shards that are not committed yet
    writer = store.writer
    committed = writer.committed_shards()
    committed -= io_skipped_shards(writer, committed)  # a read failure is not a bad image: redo
    mine = [s for s in range(writer.num_shards) if s % ctx.world == ctx.rank]
    pending = [s for s in mine if s not in committed]
    if committed and ctx.is_main:
        log.info("resuming: %d of %d shards already committed", len(committed), writer.num_shards)
    total = sum(writer.shard_rows(s)[1] - writer.shard_rows(s)[0] for s in pending)
    dataset = ViewDataset(
        source, policy, cfg.seed, cfg.views, cfg.center_view, teacher.input_size, cfg.max_pixels,
        store.positions, decode, first_view=extending.first_view if extending else 0,
    )  # fmt: skip
    batches = list(shard_batches(pending, writer.shard_rows, max(1, cfg.batch_size // cfg.stored_views)))
    loader = view_loader(dataset, batches, cfg.workers, pin_memory=ctx.device.type == "cuda")
    # the loop: read -> teacher -> write (batch k leaves the teacher once batch k+1's forward is queued)
    t0, res = time.perf_counter(), TeacherPass()
    with _sink(cfg, ctx, store) as sink:
        for items, cls, tokens in run_teacher(loader, teacher, cfg.tokens, ctx.device, amp, res):
            res.skipped += sink.add(items, cls, tokens)
            res.done += len(items)
            if progress is not None:
                progress(res.done, total)
    barrier()
    summary = _summary(cfg, ctx, store, res, time.perf_counter() - t0, sink.seconds, mine, pending)
    if ctx.is_main:
        timings = {k: summary[k] for k in _TIMINGS}
        # the config is stored once, in the store's config record (`writer.open_store`)
        summary["manifest"] = manifest = writer.finalize(extra={"timings": timings})
        summary["skipped_total"] = len(manifest.get("skipped", []))
        if extending is not None:
            extending.register(manifest)  # the store's extension index, written last
    barrier()
    return summary


def _sink(cfg: ExtractConfig, ctx: DistContext, store: OpenedStore) -> ShardSink:
    """This rank's shard writers (`--writers`, `--writer-kind`), said once in the log."""
    kind = cfg.writer_kind_used()
    if ctx.is_main:
        log.info(
            "shard writers: %d %s%s",
            cfg.writers,
            kind,
            ("es" if kind == "process" else "s") * (cfg.writers > 1),
        )
    return ShardSink(store.writer, store.keys, store.labels, cfg.writers, kind)


def _row_order(cfg: ExtractConfig, source_kind: str) -> str:
    """The order of the store's rows (`cospress.store.row_order`); with ``auto``, a store already at
    --out is resumed in its own order (one made before row orders existed: source order)."""
    if cfg.row_order == "auto" and not cfg.overwrite:
        dest = Dest(cfg.out)
        try:
            return store_row_order(dest.read_record(dest.paths().identity))
        except (FileNotFoundError, ValueError):  # no store yet (or a damaged one: open_store says so)
            pass
    return resolve_row_order(cfg.row_order, source_kind)


def _summary(
    cfg: ExtractConfig, ctx: DistContext, store: OpenedStore, res: TeacherPass, seconds: float,
    writing: float, mine: list[int], pending: list[int],
) -> dict[str, Any]:  # fmt: skip
    """What this rank did: counts and seconds (total, reading, in the teacher, writing)."""
    return {
        "rank": ctx.rank,
        "world_size": ctx.world,
        "images": res.done,
        "skipped": res.skipped,
        "shards_written": len(pending),
        "shards_already_committed": len(mine) - len(pending),
        "seconds": seconds,
        "images_per_second": res.done / seconds if seconds > 0 else 0.0,
        "seconds_reading": res.reading,
        "seconds_teacher": res.teacher,
        "seconds_writing": writing,
        "store": str(store.writer.dest),
        "estimated_bytes": store.estimated_bytes,
    }


__all__ = ["ExtractConfig", "run_extract"]
