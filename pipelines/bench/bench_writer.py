"""Benchmark stage 1's shard writer (issue 26) on synthetic ViT-S/14-shaped features.

Three sections, each written to ``--out`` (JSON) and ``--out`` with ``.md`` (a table) as soon as it ends:

(a) codecs: per array (fp16 tokens, int8 tokens, CLS) and blosc setting, the compression ratio and
    the encode / decode MB/s per CPU-second of one thread (one call per inner chunk, as
    `store.shardio` does; CPU time, so a loaded machine does not skew it);
(b) threads: `ShardSink` with 1 and 2 writers, threads and processes (``--kinds``), rounds interleaved,
    each writing ``--shards`` shards of ``--shard-images`` images x ``--views`` views x 257 tokens x 384
    (fp16 and int8 stores) into ``--dir`` (default /dev/shm: the CPU cost of compress + hash + write,
    not the disk's speed); GB/s of the float16 features handed to the writers (wall, and per
    CPU-second of the process and its writer processes) and the wall-time ratio to one writer thread;
    beside them, interleaved, the ceiling: sha256 of the same bytes in 1 and 2 threads (pure C, no
    GIL), i.e. the ratio this machine gives two busy threads right now; the 1-minute load average is
    recorded before and after each section;
(c) per-shard cost: ``--tiny-shards`` tiny shards written one after another into a store, the
    median ms per shard (wall, and CPU of the process) over the first and the last 100 (and the old per-shard glob of the
    array folders, done beside it on a second store: what the writer did before issue 26).

The features are seeded synthetic teacher outputs (a per-view offset and a low-rank part plus
noise, as bench_store.py's), not a real DINOv2's: ratios on real features differ (DESIGN.md: ~1.15x
with zstd on float16 embeddings); speeds do not depend much on the values.

    python pipelines/bench/bench_writer.py --out bench-writer.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import cospress  # noqa: E402, F401  first: it sets the OpenMP wait policy before torch loads

# isort: split

import numpy as np  # noqa: E402
from numcodecs import Blosc  # noqa: E402

from cospress.extract.writer import ShardBuffer, ShardSink  # noqa: E402
from cospress.runtime import tune_malloc  # noqa: E402
from cospress.store import StoreLayout, StoreWriter, make_identity  # noqa: E402
from cospress.store.codecs import encode_tokens  # noqa: E402

T, DT = 257, 384  # ViT-S/14 at 224 px: CLS + 16 x 16 patch tokens, 384 dims
H100_BYTES = 2.4e9  # fp16 tokens/s of an H100 running ViT-S/14 (12,400 views/s x 257 x 384 x 2 B)
CODECS = {  # name -> (cname, clevel, shuffle)
    "zstd-1 shuffle (before)": ("zstd", 1, Blosc.SHUFFLE),
    "lz4-1 noshuffle (tokens now)": ("lz4", 1, Blosc.NOSHUFFLE),
    "lz4-1 shuffle": ("lz4", 1, Blosc.SHUFFLE),
    "none (blosc clevel 0)": ("lz4", 0, Blosc.NOSHUFFLE),
}


def features(rows: int, views: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(cls [n, V, Dt], tokens [n, V, T, Dt]) float16: per-view offset + rank-48 part + noise."""
    g = np.random.default_rng(seed)
    offsets = g.normal(size=(8, DT)).astype(np.float32)
    basis = (g.normal(size=(48, DT)) / np.sqrt(48)).astype(np.float32)
    base = g.normal(size=(rows, views, 1, 8)).astype(np.float32) @ offsets
    low = g.normal(size=(rows, views, T, 48)).astype(np.float32) @ basis * 1.5
    tok = (base + low + g.normal(size=(rows, views, T, DT)).astype(np.float32) * 0.35).astype(np.float16)
    cls = (base[:, :, 0] * 1.2 + g.normal(size=(rows, views, DT)).astype(np.float32) * 0.5).astype(np.float16)
    return cls, tok


def code(codec: Blosc, raw: list[np.ndarray], repeats: int = 3) -> tuple[float, float, int]:
    """(encode, decode) CPU seconds of this thread for every chunk (best of ``repeats``), and the bytes."""
    enc_s = dec_s = float("inf")
    for _ in range(repeats):
        t0 = time.thread_time()
        enc = [bytes(codec.encode(r)) for r in raw]
        t1 = time.thread_time()
        for e in enc:
            codec.decode(e)
        t2 = time.thread_time()
        enc_s, dec_s = min(enc_s, t1 - t0), min(dec_s, t2 - t1)
    return enc_s, dec_s, sum(map(len, enc))


def in_thread(fn):
    """``fn()`` in a thread of its own, as the writer calls blosc (numcodecs keeps blosc single-threaded
    outside the main thread): its CPU time is one core's."""
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def bench_codecs(cls: np.ndarray, tok: np.ndarray) -> list[dict]:
    i8, _ = encode_tokens("int8", tok, None)
    arrays = {
        "fp16 tokens": (tok.reshape(-1, T * DT), 2),
        "int8 tokens": (i8.reshape(-1, T * DT), 1),
        "cls (fp16)": (cls.reshape(cls.shape[0], -1), 2),
    }
    rows = []
    for array, (chunks, typesize) in arrays.items():
        raw = [np.ascontiguousarray(c).view(np.uint8) for c in chunks]
        nbytes = sum(r.nbytes for r in raw)
        for name, (cname, clevel, shuffle) in CODECS.items():
            codec = Blosc(cname=cname, clevel=clevel, shuffle=shuffle, typesize=typesize)
            enc_s, dec_s, size = in_thread(lambda c=codec, r=raw: code(c, r))
            rows.append({
                "array": array, "codec": name, "ratio": nbytes / size,
                "encode_mb_s": nbytes / enc_s / 1e6, "decode_mb_s": nbytes / dec_s / 1e6,
            })  # fmt: skip
    return rows


def open_store(
    path: Path, rows: int, shard: int, views: int, dim: int, tokens: int, codec: str
) -> StoreWriter:
    ident = make_identity(
        teacher={"name": "vit_small_patch14_dinov2", "fingerprint": "0" * 64, "dim": dim},
        view_policy={}, policy_fingerprint="0" * 64, k=views, center_view=False, seed=0,
        source={"spec": "synthetic", "keys_sha256": "0" * 64, "count": rows}, param_names=["p"],
        token_codec={"name": codec},
    )  # fmt: skip
    layout = StoreLayout(rows, shard, views, dim, tokens, 1, True, token_codec=codec)
    return StoreWriter.open(path, ident, layout)


def timed_sink(
    root: Path, a, codec: str, writers: int, kind: str, cls: np.ndarray, tok: np.ndarray
) -> tuple[float, float]:
    """(wall, CPU) seconds for a `ShardSink` of ``writers`` writers (threads or processes) to write
    ``a.shards`` shards, as a run does: a pool of filled shard buffers reused from shard to shard (the
    contents are kept, so this thread's work is next to nothing) and the writer processes started
    first (a run starts them while the teacher computes its first shard). CPU seconds are this
    process's plus its writer processes': on a loaded machine they, not the wall time, say what one
    core does."""
    n = a.shards * a.shard_images
    w = open_store(Path(tempfile.mkdtemp(dir=root)), n, a.shard_images, a.views, DT, T, codec)
    keys = [f"k{i}" for i in range(n)]
    sink = ShardSink(w, keys, [0] * n, writers, kind)
    pool = max(2, writers) + writers + 1  # the queue, the shards being written, the one being filled
    for _ in range(pool):
        buf = ShardBuffer(w.layout, 0, keys, [0] * n, shared=kind == "process")
        buf.cls[:], buf.tokens[:] = cls, tok
        sink.free.put(buf)
    with sink:
        sink.ready()
        t0, c0 = time.perf_counter(), time.process_time()
        for s in range(a.shards):
            sink.buffer(s).valid[:] = 1  # a reused buffer: the same features, every row valid
            sink.filled(s, a.shard_images)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    shutil.rmtree(w.path)
    return seconds, cpu + (sink.cpu_seconds if kind == "process" else 0.0)


def timed_hash(blob: bytes, threads: int, repeats: int) -> tuple[float, float]:
    """(wall, CPU) seconds for ``threads`` threads to sha256 ``blob`` ``repeats`` times each: pure C with
    the GIL released, so its 2-thread ratio is what the machine gives two busy threads right now (the
    writer's own ratio is judged against it on a shared machine)."""
    ts = [threading.Thread(target=lambda: [hashlib.sha256(blob).digest() for _ in range(repeats)])
          for _ in range(threads)]  # fmt: skip
    t0, c0 = time.perf_counter(), time.process_time()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return time.perf_counter() - t0, time.process_time() - c0


def prefault(gb: float) -> None:
    """Allocate and touch ``gb`` GB, then free it: on a virtual machine whose memory the host backs lazily
    (and takes back once the guest frees it: a Firecracker guest's free page reporting), a case that
    writes more than the memory freed just before pays the host's page faults in its own CPU time
    (measured: 55 -> 550 ms per 200 MB tokens file after ~3 GB; docs/performance.md)."""
    if gb > 0:
        block = np.ones(int(gb * 1e9), np.uint8)
        del block


def bench_threads(a, cls: np.ndarray, tok: np.ndarray) -> list[dict]:
    """Each store (fp16, int8) with 1 and 2 writers of each kind, and the sha256 ceiling in 1 and 2
    threads; the ratio is to one writer thread (the default of a 1-writer run), measured in the same rounds."""
    root = Path(tempfile.mkdtemp(dir=a.dir, prefix="bench-writer-"))
    fp16_bytes = a.shards * (cls.nbytes + tok.nbytes)
    blob, repeats = tok.tobytes(), max(1, a.shards // 2)
    cases = [(codec, kind, n) for codec in ("fp16", "int8") for kind in a.kinds.split(",") for n in (1, 2)]
    cases += [("sha256 only (ceiling)", "thread", n) for n in (1, 2)]
    times = {case: [] for case in cases}
    for _ in range(a.rounds):  # every round runs everything, so each ratio is measured under one load
        for codec, kind, n in cases:
            if codec.startswith("sha256"):  # the same bytes per thread count as the writer's
                wall, cpu = timed_hash(blob, n, repeats)
                scale = fp16_bytes / (n * repeats * len(blob))
                times[codec, kind, n].append((wall * scale, cpu * scale))
            else:
                prefault(a.prefault_gb)
                times[codec, kind, n].append(timed_sink(root, a, codec, n, kind, cls, tok))
    rows = []
    for (codec, kind, n), ts in times.items():
        best, cpu = min(ts)
        rows.append({
            "codec": codec, "kind": kind, "writers": n, "seconds": best, "cpu_seconds": cpu, "all": ts,
            "gb_s": fp16_bytes / best / 1e9, "gb_s_per_core": fp16_bytes / best / 1e9 / n,
            "gb_per_cpu_s": fp16_bytes / cpu / 1e9, "views_s": a.shards * a.shard_images * a.views / best,
            "ratio_to_1_thread": min(times[codec, "thread", 1])[0] / best,
            "ratio_to_1_of_kind": min(times[codec, kind, 1])[0] / best,
        })  # fmt: skip
    os.rmdir(root)
    return rows


def bench_flat(a) -> dict:
    """ms per tiny shard over ``a.tiny_shards`` shards: the writer now, and with the old per-shard glob."""
    out = {}
    for mode in ("now", "old glob per shard"):
        w = open_store(
            Path(tempfile.mkdtemp(dir=a.flat_dir, prefix=f"flat-{mode[:3]}-")),
            a.tiny_shards,
            1,
            1,
            8,
            4,
            "fp16",
        )
        one = {"cls": np.ones((1, 1, 8), np.float16), "tokens": np.ones((1, 1, 4, 8), np.float16),
               "views": np.zeros((1, 1, 1), np.float32), "labels": [0], "valid": [1]}  # fmt: skip
        ms, cpu = [], []
        for s in range(a.tiny_shards):
            t0, c0 = time.perf_counter(), time.process_time()
            if mode != "now":
                for key in w._shard_files(s).values():
                    path = w.path / key
                    for stale in path.parent.glob(f".{path.name}.*.tmp"):
                        stale.unlink(missing_ok=True)
            w.write_shard(s, keys=[f"k{s}"], **one)
            ms.append((time.perf_counter() - t0) * 1e3)
            cpu.append((time.process_time() - c0) * 1e3)
        out[mode] = {}
        for what, xs in (("wall", ms), ("cpu", cpu)):
            first, last = statistics.median(xs[:100]), statistics.median(xs[-100:])
            out[mode][what] = {"first_100_ms": first, "last_100_ms": last, "last_over_first": last / first,
                               "per_500_ms": [statistics.median(xs[i : i + 500]) for i in range(0, len(xs), 500)]}  # fmt: skip
        shutil.rmtree(w.path)
    return out


def markdown(res: dict) -> str:
    loads = ", ".join(f"{k[5:]} {v[0]:.1f} -> {v[1]:.1f}" for k, v in res.items() if k.startswith("load_"))
    lines = [f"CPU: {res['cpu']}, {res['cores']} cores; load average {loads}; {res['note']}", ""]
    if "codecs" in res:
        lines += ["| array | codec | ratio | encode MB/s/core | decode MB/s/core |", "|---|---|---|---|---|"]
        lines += [f"| {r['array']} | {r['codec']} | {r['ratio']:.3f} | {r['encode_mb_s']:.0f} | {r['decode_mb_s']:.0f} |"
                  for r in res["codecs"]]  # fmt: skip
        lines.append("")
    if "threads" in res:
        lines += ["| store | writers | wall GB/s (fp16 in) | wall GB/s per writer | GB per CPU-second | views/s | "
                  "x 1 thread (wall) | x 1 of its kind |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {r['codec']} | {r['writers']} {r['kind']}{'s' * (r['writers'] > 1)} | {r['gb_s']:.2f} | "
                  f"{r['gb_s_per_core']:.2f} | {r['gb_per_cpu_s']:.2f} | {r['views_s']:.0f} | "
                  f"{r['ratio_to_1_thread']:.2f} | {r['ratio_to_1_of_kind']:.2f} |" for r in res["threads"]]  # fmt: skip
        lines.append("")
    if "flat" in res:
        lines += ["| writer | time | ms/shard, shards 1-100 | last 100 | last / first | medians per 500 shards |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {m} | {w} | {r['first_100_ms']:.2f} | {r['last_100_ms']:.2f} | {r['last_over_first']:.2f} | "
                  f"{' '.join(f'{x:.1f}' for x in r['per_500_ms'])} |"
                  for m, by in res["flat"].items() for w, r in by.items()]  # fmt: skip
    return "\n".join(lines) + "\n"


def save(res: dict, out: Path) -> None:
    out.write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-writer.json"))
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    ap.add_argument("--flat-dir", default=None, help="where the tiny-shard stores go (default: --dir)")
    ap.add_argument("--shards", type=int, default=32)
    ap.add_argument(
        "--shard-images",
        type=int,
        default=32,
        help="a commit's fixed work (4 views' int8 "
        "fidelity) is amortised over a shard, so tiny shards overstate it",
    )
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kinds", default="thread,process", help="writer kinds in the threads section")
    ap.add_argument(
        "--prefault-gb",
        type=float,
        default=0.0,
        help="touch this many GB before each writer case (a VM that backs its memory lazily: see prefault)",
    )
    ap.add_argument("--tiny-shards", type=int, default=5000)
    ap.add_argument("--sections", default="codecs,threads,flat")
    ap.add_argument("--note", default="", help="what else ran on the machine")
    a = ap.parse_args()
    a.flat_dir = a.flat_dir or a.dir
    tune_malloc()  # as extract-teacher runs (cospress.extract.run)
    res = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "note": a.note,
        "args": vars(a),
    }
    try:
        res["cpu"] = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    res["args"] = {k: str(v) for k, v in vars(a).items()}
    cls, tok = features(a.shard_images, a.views)
    for section in a.sections.split(","):
        t0, load0 = time.perf_counter(), os.getloadavg()[0]
        if section == "codecs":
            res["codecs"] = bench_codecs(cls, tok)
        elif section == "threads":
            res["threads"] = bench_threads(a, cls, tok)
            res["projection_16_cores"] = {
                "writers": 4, "gb_s": 4 * max(r["gb_per_cpu_s"] for r in res["threads"] if r["codec"] == "fp16"),
                "h100_vit_s14_gb_s": H100_BYTES / 1e9,
            }  # fmt: skip
        elif section == "flat":
            res["flat"] = bench_flat(a)
        res[f"seconds_{section}"] = time.perf_counter() - t0
        res[f"load_{section}"] = [load0, os.getloadavg()[0]]  # 1-minute load average, before and after
        save(res, a.out)
        print(markdown(res), flush=True)


if __name__ == "__main__":
    main()
