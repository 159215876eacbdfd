"""Stage 1 writer: create or open the store, fill shard buffers, write and commit full shards in the
background so the teacher keeps running while a shard is compressed and written."""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cospress.config import save_config, to_dict
from cospress.errors import StoreError
from cospress.extract.codec_fit import choose_codec, stored_codec
from cospress.extract.config import ExtractConfig
from cospress.extract.writer_proc import SharedArrays, WriterProcess
from cospress.runtime import barrier
from cospress.store import StoreLayout, StoreWriter
from cospress.store.append import open_append, plan_append
from cospress.store.dest import Dest
from cospress.store.projection import codec_entry
from cospress.store.row_order import SHUFFLED, shuffled_rows, store_row_order
from cospress.utils import human_bytes, redact_config

log = logging.getLogger(__name__)


class ShardBuffer:
    """One shard's rows, filled batch by batch until every row has arrived.

    cls float16 [n, V, D], tokens float16 [n, V, T, D] (None without tokens), views float32 [n, V, P],
    valid uint8 [n], keys and labels [n], skipped [{key, reason}]. With ``shared`` the arrays live in
    shared memory that writer processes map (`writer_proc.SharedArrays`), else in this process's.
    """

    def __init__(
        self, layout: StoreLayout, shard: int, keys: list[str], labels: list[int], shared: bool = False
    ) -> None:
        start, stop = layout.shard_rows(shard)
        n, v, d = stop - start, layout.stored_views, layout.dim
        specs = {
            "cls": ((n, v, d), "float16"),
            "views": ((n, v, layout.num_params), "float32"),
            "valid": ((n,), "uint8"),
        }
        if layout.tokens:
            specs["tokens"] = ((n, v, layout.num_tokens, d), "float16")
        self.shared = SharedArrays(specs) if shared else None
        arrays = self.shared.arrays if shared else {k: np.zeros(*spec) for k, spec in specs.items()}
        self.cls, self.views, self.valid = arrays["cls"], arrays["views"], arrays["valid"]
        self.tokens = arrays.get("tokens")
        self.reused = False  # fresh arrays are zeros: nothing to clear
        self.reset(layout, shard, keys, labels)

    def reset(self, layout: StoreLayout, shard: int, keys: list[str], labels: list[int]) -> None:
        """Hold ``shard`` (of this buffer's row count): its keys and labels, no row arrived. The feature
        arrays keep their old values: every row's views are written by `fill`, and `complete` zeroes
        the features of the rows that were skipped (so a reused buffer costs no page faults nor memset)."""
        start, stop = layout.shard_rows(shard)
        self.start, self.remaining = start, stop - start
        self.valid[:] = 0
        self.keys = keys[start:stop]
        self.labels = np.asarray(labels[start:stop], np.int64)
        self.skipped: list[dict[str, str]] = []

    def complete(self) -> None:
        """Every row has arrived: in a reused buffer the features of skipped rows are zero-filled (a
        store's rule; a fresh buffer's are zeros already)."""
        bad = np.flatnonzero(self.valid == 0) if self.reused else []
        if len(bad):
            self.cls[bad] = 0
            if self.tokens is not None:
                self.tokens[bad] = 0

    def fill(self, items: list[dict], cls: np.ndarray | None, tok: np.ndarray | None) -> int:
        """Write a batch's rows (`ViewDataset` items; cls / tok of its good images, in order) into
        this buffer; returns how many were skipped."""
        g = skipped = 0
        for it in items:
            i = it["row"] - self.start
            self.views[i] = it["params"]
            if it["images"] is None:
                self.skipped.append({"key": self.keys[i], "reason": it["reason"]})
                skipped += 1
                log.warning("skipped %s: %s", self.keys[i], it["reason"])
                continue
            self.cls[i] = cls[g]
            if tok is not None:
                self.tokens[i] = tok[g]
            self.valid[i] = 1
            g += 1
        return skipped

    def contents(self) -> dict[str, Any]:
        """The keyword arguments of `StoreWriter.write_shard` for this shard."""
        names = ("cls", "tokens", "views", "keys", "labels", "valid", "skipped")
        return {name: getattr(self, name) for name in names}


KILL_ENV = "COSPRESS_TEST_EXTRACT_KILL"  # "RANK:N": that rank SIGKILLs itself after N commits (tests)


def _kill_after() -> int | None:
    """The test hook of `KILL_ENV`: this rank's commit count to die at, on torchrun's first attempt only."""
    spec = os.environ.get(KILL_ENV)
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    rank, count = (int(v) for v in spec.split(":"))
    return count if int(os.environ.get("RANK", "0")) == rank else None


def _one_torch_thread() -> None:
    """Torch ops in this thread (a writer thread's codec fidelity) use one thread, not the process's
    pool: each writer thread is one core's work, and two threads sharing the pool of a 2-core machine
    slowed each other. OpenMP's setting is the calling thread's (the main thread keeps its pool), but
    torch also keeps it as the default of threads started later: `ShardSink` restores that on exit."""
    import torch

    torch.get_num_threads()  # this thread's own setting is made first (torch sets it lazily)
    torch.set_num_threads(1)


def _restore_torch_threads() -> None:
    """Torch's default for threads started from now on: the calling (main) thread's own count again."""
    import torch

    torch.set_num_threads(torch.get_num_threads())


class ShardSink:
    """The shard buffers of one rank; ``writers`` writers write and commit the full ones.

    A writer is a thread (``kind="thread"``) or a process of its own (``"process"``,
    `cospress.extract.writer_proc`: the buffers are then in shared memory, and no GIL is shared with
    the teacher's loop or another writer). Each writer writes whole shards (zarr's shard files are
    rewritten whole), so up to ``writers`` shards are compressed, hashed and written at once. At most
    ``writers`` full shards wait in the queue, so host memory holds up to 2 x ``writers`` full shard
    buffers beside the ones being filled; a written shard's buffer is kept for a later shard
    (`buffer`), so that peak is never exceeded and stays allocated until the sink is left. Use as a
    context manager: leaving it waits for the last shards and raises a write error.
    """

    def __init__(
        self, writer: StoreWriter, keys: list[str], labels: list[int], writers: int = 1, kind: str = "thread"
    ) -> None:
        if kind not in ("thread", "process"):
            raise ValueError(f"a shard writer is a thread or a process, not {kind!r}")
        self.writer, self.keys, self.labels, self.kind = writer, keys, labels, kind
        self.buffers: dict[int, ShardBuffer] = {}
        self.queue: queue.Queue = queue.Queue(maxsize=max(2, writers))
        self.free: queue.SimpleQueue = queue.SimpleQueue()  # written shards' buffers, to reuse
        self.count = max(1, writers)
        self.procs: list[WriterProcess] = []
        self.threads: list[threading.Thread] = []
        self.error: BaseException | None = None
        self.seconds = 0.0  # spent writing, summed over the writers
        self.cpu_seconds = 0.0  # the writers' CPU time (a writer process's own)
        self.committed = 0
        self._lock = threading.Lock()
        self._kill_after = _kill_after()

    def add(self, items: list[dict], cls: np.ndarray | None, tok: np.ndarray | None) -> int:
        """A batch's rows (one shard's: `ShardBuffer.fill`) into that shard's buffer, which goes to the
        writers once full. Returns how many rows were skipped."""
        shard = items[0]["row"] // self.writer.layout.shard_size
        skipped = self.buffer(shard).fill(items, cls, tok)
        self.filled(shard, len(items))
        return skipped

    def buffer(self, shard: int) -> ShardBuffer:
        """The buffer of ``shard``: a written shard's buffer of the same size when one is free (reused:
        a fresh shard-sized array is page-faulted in by the teacher's thread, ~1.6 GB per default
        ViT-S/14 shard), else a new one."""
        if shard not in self.buffers:
            layout, buf = self.writer.layout, None
            start, stop = layout.shard_rows(shard)
            while buf is None and not self.free.empty():
                buf = self.free.get_nowait()
                if len(buf.valid) != stop - start:
                    self._drop(buf)
                    buf = None
            if buf is None:
                buf = ShardBuffer(layout, shard, self.keys, self.labels, shared=self.kind == "process")
            else:
                buf.reused = True
                buf.reset(layout, shard, self.keys, self.labels)
            self.buffers[shard] = buf
        return self.buffers[shard]

    def _drop(self, buf: ShardBuffer) -> None:
        """A buffer no longer used: its shared memory released here and in the writer processes."""
        if buf.shared is not None:
            for proc in self.procs:
                proc.forget(buf.shared)
            buf.shared.close()

    def filled(self, shard: int, rows: int) -> None:
        """``rows`` more rows of ``shard`` have arrived; a full shard goes to the writers."""
        buf = self.buffers[shard]
        buf.remaining -= rows
        if buf.remaining == 0:
            if self.error is not None:
                raise self.error
            buf.complete()
            self.queue.put((shard, self.buffers.pop(shard)))

    def ready(self) -> None:
        """Wait until every writer process has opened the store (benchmarks; a run need not)."""
        for proc in self.procs:
            proc.ready.wait()

    def _write_here(self, shard: int, buf: ShardBuffer) -> float:
        """Write and commit ``shard`` in this thread; returns the thread's CPU seconds."""
        cpu = time.thread_time()
        self.writer.write_shard(shard, **buf.contents())
        return time.thread_time() - cpu

    def _run(self, proc: WriterProcess | None) -> None:
        if proc is None:
            _one_torch_thread()
            write = self._write_here
        else:
            write = proc.write
            try:
                proc.opened()
            except BaseException as e:
                self.error = e
        while (item := self.queue.get()) is not None:
            shard, buf = item
            if self.error is not None:
                continue
            t0, cpu = time.perf_counter(), 0.0
            try:
                cpu = write(shard, buf)
                self.free.put(buf)  # written: its arrays serve a later shard
            except BaseException as e:  # surfaced by the main thread
                self.error = e
            with self._lock:
                self.seconds += time.perf_counter() - t0
                self.cpu_seconds += cpu
                self.committed += self.error is None
                if self._kill_after is not None and self.committed >= self._kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)  # tests: a rank dies mid-run
        if proc is not None:
            proc.close()

    def __enter__(self) -> ShardSink:
        if self.kind == "process":  # started from this thread: they die with it (PR_SET_PDEATHSIG)
            self.procs = [WriterProcess(self.writer, i) for i in range(self.count)]
        workers = self.procs or [None] * self.count
        self.threads = [
            threading.Thread(target=self._run, args=(p,), daemon=True, name=f"cospress-shard-writer-{i}")
            for i, p in enumerate(workers)
        ]
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for _ in self.threads:
            self.queue.put(None)
        for t in self.threads:
            t.join()
        if self.kind == "thread":
            _restore_torch_threads()
        self.procs = []  # exited: the shared buffers are released here alone
        for buf in self.buffers.values():
            self._drop(buf)
        while not self.free.empty():
            self._drop(self.free.get_nowait())
        if self.error is not None:
            raise self.error


def check_free_disk(out: Path, need: int) -> None:
    """StoreError when the disk of ``out`` has less than ``need`` bytes free."""
    probe = out if out.exists() else out.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise StoreError(
            f"not enough free disk for the store at {out}: needs up to {human_bytes(need)}, "
            f"{human_bytes(free)} free; use --no-tokens, fewer --views, --limit, or another --out"
        )


@dataclass
class OpenedStore:
    """The store a run writes: its writer, the key and label of every row, and for an append the
    source index of every row (-1 for the rows it already has)."""

    writer: StoreWriter
    keys: list[str]
    labels: list[int]
    positions: np.ndarray | None
    estimated_bytes: int


def _save_config(cfg: ExtractConfig, out: Dest) -> None:
    """The resolved config beside the store (URLs redacted): its config record (a legacy store: YAML)."""
    paths = out.paths()
    if paths.legacy:
        save_config(cfg, out.path / paths.config)
    else:
        out.write_record(paths.config, redact_config(to_dict(cfg)), paths)


def open_store(
    cfg: ExtractConfig, identity: dict, layout: StoreLayout, source: Any, teacher: Any, is_main: bool
) -> OpenedStore:
    """Create (main rank) or open (other ranks, after a barrier) the store at ``cfg.out``.

    ``layout`` is that of a new store of the source's rows; with ``cfg.append`` the store grows by
    the source's keys it lacks. The main rank chooses the token codec (`codec_fit.choose_codec`:
    for pca the projection is fitted here, before any shard, or taken from the store); other ranks
    take the store's.
    """
    dest = Dest(cfg.out)
    out = dest.path if dest.local else cfg.out  # a local Path, or the URL (no local staging copy)
    keys, labels, plan, projection = source.keys(), source.labels(), None, None
    if is_main:
        entry, projection = choose_codec(cfg, source, teacher)
    else:
        name = cfg.codec().name
        if name == "pca":
            barrier()  # the main rank fits the projection and creates the store first
            entry = (stored_codec(out) or ({"name": name}, None))[0]
        else:
            entry = codec_entry(name)
    identity = {**identity, "token_codec": entry}
    layout = dataclasses.replace(
        layout, token_codec=entry["name"], token_dim=int(entry.get("components") or layout.dim)
    )
    positions = None
    if cfg.append:
        plan = plan_append(out, identity, keys, labels, identity["source"], layout)
        keys, labels, layout = plan.keys, plan.labels, plan.layout  # per row of the grown store
        positions = plan.positions
    elif store_row_order(identity) == SHUFFLED:  # row i is source image positions[i]
        positions = shuffled_rows(keys, cfg.seed)
        keys, labels = [keys[i] for i in positions], [labels[i] for i in positions]
    estimate = layout.estimate_bytes()
    if is_main:
        log.info(
            "store %s: %d images x %d views, teacher %s (dim %d, %d tokens, %s) -> about %s before compression "
            "(float16 embeddings compress only ~1.15x)",
            dest, len(keys), layout.stored_views, teacher.name, layout.dim,
            layout.num_tokens if layout.tokens else 0, entry["name"], human_bytes(estimate),
        )  # fmt: skip
        if dest.local and not (cfg.overwrite is False and dest.exists(dest.paths().manifest)):
            check_free_disk(out, estimate)
        if plan is not None:
            writer = open_append(plan)
        else:
            writer = StoreWriter.open(
                out, identity, layout, overwrite=cfg.overwrite, create=True, projection=projection
            )
        _save_config(cfg, dest)
        if entry["name"] == "pca" and layout.tokens:
            barrier()  # the other ranks wait for the projection above
    barrier()
    if not is_main:
        writer = StoreWriter.open(out, identity if plan is None else plan.identity, layout, create=False)
        writer.protected_shards = 0 if plan is None else plan.old_shards
    return OpenedStore(writer, keys, labels, positions, estimate)
