"""Benchmark the stream reader (`cospress.store.stream`) beside the random-access reader (`StoreReader`).

Three parts, each its own sub-command, run on synthetic stores written with the project's writer:

- ``gets``: requests counted on a moto S3 server on 127.0.0.1 (one werkzeug log line per request) for
  one full epoch of the stream order (every lane of one rank, and of each rank of a world of 2) over a
  store of ``--rows`` rows with tiny dims, and for the random-access reader on the first
  ``--random-batches`` batches of the same epoch (extrapolated per image); plus the requests of
  opening the store (manifest, columns, array metadata).
- ``speed``: target reads (what a stage-2 worker reads: CLS, int8 tokens + scales, view params of R
  views of every image of a batch) of a ViT-S/14-shaped int8 store (257 x 384 per view) on the moto
  server, stream vs random access, side by side in one process, views/s (one core: one reading thread).
- ``images``: a ``wds:`` source in the bucket, images read one by one in the stream's order (what
  the random-access source does) vs one byte range per tar per store shard (``ImageRanges``).
- ``memory``: peak RSS of a loader worker process (spawned, so it holds only what it is sent) that
  streams ``--batches`` batches, and of the main process after opening the store and its columns,
  at each of ``--rows`` (e.g. 10000 1000000).

    python pipelines/bench/bench_stream.py gets --rows 100352 --out bench-stream-gets.json
    python pipelines/bench/bench_stream.py speed --rows 384 --out bench-stream-speed.json
    python pipelines/bench/bench_stream.py images --out bench-stream-images.json
    python pipelines/bench/bench_stream.py memory --rows 10000 1000000 --out bench-stream-memory.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from cospress.distill.data import BatchPlan, read_targets  # noqa: E402
from cospress.store import StoreLayout, StoreReader, StoreWriter, make_identity  # noqa: E402
from cospress.store.stream import StreamOrder, StreamReader, gather, lane_batches  # noqa: E402

P = 11  # view params of policy version 1


def write_store(path: Path, rows: int, shard: int, k: int, dt: int, t: int, codec: str) -> Path:
    """A complete store of ``rows`` synthetic rows (keys k0000000..., seeded features)."""
    keys = [f"k{i:08d}" for i in range(rows)]
    teacher = {"name": "synthetic", "fingerprint": "synthetic-" + "0" * 54, "input_size": 224,
               "grid": [int(np.sqrt(t)), int(np.sqrt(t))], "dim": dt}  # fmt: skip
    ident = make_identity(
        teacher=teacher, view_policy={"version": 1}, policy_fingerprint="synthetic", k=k, center_view=False,
        seed=0, source={"spec": "synthetic", "kind": "synthetic", "count": rows}, param_names=[f"p{i}" for i in range(P)],
        token_codec={"name": codec},
    )  # fmt: skip
    w = StoreWriter.open(str(path), ident, StoreLayout(rows, shard, k, dt, t, P, t > 0, token_codec=codec))
    g = np.random.default_rng(0)
    for s in range(w.num_shards):
        a, b = w.shard_rows(s)
        n = b - a
        w.write_shard(
            s, cls=g.normal(size=(n, k, dt)).astype(np.float16),
            tokens=g.normal(size=(n, k, t, dt)).astype(np.float16) if t else None,
            views=g.random((n, k, P), dtype=np.float32), keys=keys[a:b], labels=np.zeros(n, np.int64),
            valid=np.ones(n, np.uint8),
        )  # fmt: skip
    w.finalize()
    return path


class Moto:
    """A moto S3 server on 127.0.0.1 with a bucket; ``count()`` = requests by method since the last reset."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.lines: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda rec: self.lines.append(rec.getMessage())  # type: ignore[method-assign]
        wl = logging.getLogger("werkzeug")
        wl.setLevel(logging.INFO)
        wl.addHandler(handler)
        wl.propagate = False
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="x",
                          AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True).mkdir("bucket")

    def publish(self, store: Path, name: str) -> str:
        from cospress.store.publish import publish_store

        url = f"s3://bucket/{name}"
        publish_store(str(store), url)
        return url

    def count(self, reset: bool = True) -> dict[str, int]:
        out: dict[str, int] = {}
        for line in self.lines:  # a 206 answer's line is coloured: match the method before " /"
            for m in ("GET", "HEAD", "PUT", "POST"):
                if f"{m} /" in line:
                    out[m] = out.get(m, 0) + 1
        if reset:
            self.lines.clear()
        return out


def _stream_arrays(store: StoreReader) -> tuple[str, ...]:
    names = ("cls", "views")
    if store.has_tokens:
        names += ("tokens", "token_scale") if store.layout.token_codec != "fp16" else ("tokens",)
    return names


def stream_epoch(url: str, store: StoreReader, batch: int, r: int, world: int, rank: int, lanes: int,
                 max_batches: int | None = None) -> tuple[int, int]:  # fmt: skip
    """(images, views) read by one rank over its lanes in epoch 0, as stage 2 reads them."""
    reader = StreamReader(url, _stream_arrays(store))
    order = StreamOrder(train_rows=np.arange(store.num_rows), shard_size=store.shard_size,
                        num_shards=store.num_shards, seed=0, epoch=0, batch=batch, world=world, rank=rank,
                        lanes=lanes, buffer=4)  # fmt: skip
    images = 0
    for lane in range(lanes):
        for j, rows, held in lane_batches(order, lane, 0, reader, depth=2):
            views = np.stack(
                [
                    np.sort(np.random.default_rng([0, int(x)]).choice(store.stored_views, r, False))
                    for x in rows
                ]
            )
            gather(held, store.shard_size, rows, views)
            images += len(rows)
            if max_batches is not None and j + 1 >= max_batches:
                break
    return images, images * r


def random_batches(store: StoreReader, batch: int, r: int, batches: int) -> tuple[int, int]:
    plan = BatchPlan(np.arange(store.num_rows), seed=0, epoch=0, batch_size=batch * r, views_per_image=r,
                     stored_views=store.stored_views)  # fmt: skip
    images = 0
    for step in range(min(batches, len(plan))):
        rows, views = plan.rows_views(step)
        read_targets(store, rows, views, store.has_tokens, keep_int8=True)
        images += len(rows)
    return images, images * r


def cmd_gets(a: argparse.Namespace) -> dict:
    moto = Moto()
    with tempfile.TemporaryDirectory() as tmp:
        local = write_store(Path(tmp) / "s", a.rows, a.shard_size, 2, 8, 4, "fp16")
        url = moto.publish(local, "gets")
    moto.count()
    t0 = time.perf_counter()
    store = StoreReader(url)
    store.labels(), store.valid(), store.keys()
    _ = StreamReader(url, _stream_arrays(store)).layouts
    out = {"rows": a.rows, "shard_size": a.shard_size, "shards": store.num_shards, "arrays_streamed": 3,
           "open": {"requests": moto.count(), "seconds": time.perf_counter() - t0}}  # fmt: skip
    for world in (1, 2):
        for rank in range(world):
            t0 = time.perf_counter()
            images, _ = stream_epoch(url, store, a.batch, 2, world, rank, a.lanes)
            req = moto.count()
            out[f"stream_world{world}_rank{rank}"] = {
                "images": images, "requests": req, "seconds": time.perf_counter() - t0,
                "get_per_image": req.get("GET", 0) / max(images, 1),
                "get_per_array_shard": req.get("GET", 0) / (3 * -(-store.num_shards // world)),
            }  # fmt: skip
    t0 = time.perf_counter()
    images, _ = random_batches(store, a.batch, 2, a.random_batches)
    req = moto.count()
    per = req.get("GET", 0) / max(images, 1)
    out["random"] = {"images": images, "requests": req, "seconds": time.perf_counter() - t0, "get_per_image": per,
                     "epoch_gets_extrapolated": per * a.rows}  # fmt: skip
    return out


def cmd_speed(a: argparse.Namespace) -> dict:
    moto = Moto()
    with tempfile.TemporaryDirectory() as tmp:
        local = write_store(Path(tmp) / "s", a.rows, a.shard_size, a.views, 384, 256, "int8")
        url = moto.publish(local, "speed")
    store = StoreReader(url)
    out: dict = {"rows": a.rows, "shard_size": a.shard_size, "stored_views": a.views, "R": 3, "rounds": []}
    batches = a.rows // a.batch
    for _ in range(a.rounds):  # interleaved, so both see the same machine
        row = {}
        t0 = time.perf_counter()
        _, views = random_batches(store, a.batch, 3, batches)
        row["random_views_per_s"] = views / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        _, views = stream_epoch(url, store, a.batch, 3, 1, 0, 1)
        row["stream_views_per_s"] = views / (time.perf_counter() - t0)
        row["ratio"] = row["stream_views_per_s"] / row["random_views_per_s"]
        out["rounds"].append(row)
        print(json.dumps(row), flush=True)
    out["median_ratio"] = float(np.median([r["ratio"] for r in out["rounds"]]))
    return out


def _write_tars(root: Path, tars: int, per_tar: int, px: int) -> list[Path]:
    """``tars`` uncompressed WebDataset tars of ``per_tar`` seeded noise JPEGs (px x px) with a label."""
    import io
    import tarfile

    from PIL import Image

    g = np.random.default_rng(0)
    paths = []
    for t in range(tars):
        path = root / f"part-{t:03d}.tar"
        with tarfile.open(path, "w") as tf:
            for i in range(t * per_tar, (t + 1) * per_tar):
                buf = io.BytesIO()
                Image.fromarray(g.integers(0, 256, (px, px, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
                for name, data in ((f"s{i:07d}.jpg", buf.getvalue()), (f"s{i:07d}.cls", b"0")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def cmd_images(a: argparse.Namespace) -> dict:
    """Image reads of a ``wds:`` source in a bucket: one read per image in the stream's order (what the
    random-access source does) vs one byte range per tar per store shard (`ImageRanges`)."""
    import s3fs

    from cospress.data.sources import open_source
    from cospress.distill.streaming import ImageRanges

    moto = Moto()
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    with tempfile.TemporaryDirectory() as tmp:
        paths = _write_tars(Path(tmp), a.tars, a.per_tar, a.px)
        for p in paths:
            fs.put_file(str(p), f"bucket/wds/{p.name}")
        tar_mb = paths[0].stat().st_size / 2**20
    n = a.tars * a.per_tar
    spec = f"wds:s3://bucket/wds/part-{{000..{a.tars - 1:03d}}}.tar"
    moto.count()
    t0 = time.perf_counter()
    source = open_source(spec)
    out: dict = {"images": n, "tars": a.tars, "tar_mb": tar_mb, "px": a.px,
                 "open": {"requests": moto.count(), "seconds": time.perf_counter() - t0}}  # fmt: skip
    order = StreamOrder(train_rows=np.arange(n), shard_size=a.shard_size, num_shards=-(-n // a.shard_size),
                        seed=0, epoch=0, batch=64, buffer=4)  # fmt: skip
    lane = np.concatenate([order.window_rows(w) for w in order.windows(0)])[: a.sample]
    t0 = time.perf_counter()
    nbytes = sum(len(source.read_bytes(int(i))) for i in lane)
    secs = time.perf_counter() - t0
    req = moto.count()
    out["per_image"] = {"images": len(lane), "requests": req, "seconds": secs, "images_per_s": len(lane) / secs,
                        "get_per_image": req.get("GET", 0) / len(lane), "image_mb": nbytes / 2**20}  # fmt: skip
    ranges = ImageRanges(source, np.arange(n), order)
    t0 = time.perf_counter()
    got = sum(len(ranges(s)) for s in range(order.num_shards))
    secs = time.perf_counter() - t0
    req = moto.count()
    out["ranges"] = {"images": got, "requests": req, "seconds": secs, "images_per_s": got / secs,
                     "get_per_image": req.get("GET", 0) / got}  # fmt: skip
    out["speedup"] = out["ranges"]["images_per_s"] / out["per_image"]["images_per_s"]
    return out


def _hwm_mb() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MB: the high-water mark of its own memory (``ru_maxrss``
    would carry the parent's peak across fork + exec)."""
    vals = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            vals[line.split(":")[0]] = int(line.split()[1]) / 1024
    return vals.get("VmRSS", 0.0), vals.get("VmHWM", 0.0)


def _worker_rss(url: str, batches: int) -> None:
    """Body of the spawned worker: open the store state a stage-2 worker holds, stream, print its memory."""
    import torch  # noqa: F401  a distill worker has torch loaded

    base = _hwm_mb()[0]
    store = StoreReader(url)
    train = np.arange(store.num_rows)  # a worker holds the training rows and the source index
    source_index = np.arange(store.num_rows)
    t0 = time.perf_counter()
    stream_epoch(url, store, 64, 2, 1, 0, 1, max_batches=1)
    first = time.perf_counter() - t0
    stream_epoch(url, store, 64, 2, 1, 0, 1, max_batches=batches)
    rss, hwm = _hwm_mb()
    print(json.dumps({"worker_rss_after_imports_mb": base, "worker_rss_mb": rss, "worker_peak_rss_mb": hwm,
                      "first_batch_seconds": first, "held_columns_mb": (train.nbytes + source_index.nbytes) / 2**20}))  # fmt: skip


def cmd_memory(a: argparse.Namespace) -> dict:
    import subprocess

    out: dict = {"batches": a.batches, "shard_size": a.shard_size, "by_rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.rows:
            path = write_store(Path(tmp) / f"s{n}", n, a.shard_size, 2, 8, 4, "int8")
            code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_stream as b; b._worker_rss({str(path)!r}, {a.batches})"
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            t0 = time.perf_counter()
            store = StoreReader(str(path))
            keys = store.keys()
            row["main_open_seconds"] = time.perf_counter() - t0
            row["main_keys_list_mb_estimate"] = (
                sum(sys.getsizeof(k) for k in keys) / 2**20 + len(keys) * 8 / 2**20
            )
            out["by_rows"][n] = row
            print(n, json.dumps(row), flush=True)
    rows = sorted(out["by_rows"])
    out["peak_ratio_largest_to_smallest"] = (
        out["by_rows"][rows[-1]]["worker_peak_rss_mb"] / out["by_rows"][rows[0]]["worker_peak_rss_mb"]
    )
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gets")
    g.add_argument("--rows", type=int, default=100352)
    g.add_argument("--shard-size", type=int, default=1024)
    g.add_argument("--batch", type=int, default=256, help="images per rank step")
    g.add_argument("--lanes", type=int, default=2)
    g.add_argument("--random-batches", type=int, default=4)
    s = sub.add_parser("speed")
    s.add_argument("--rows", type=int, default=384)
    s.add_argument("--shard-size", type=int, default=128)
    s.add_argument("--views", type=int, default=4, help="stored views")
    s.add_argument("--batch", type=int, default=32)
    s.add_argument("--rounds", type=int, default=3)
    i = sub.add_parser("images")
    i.add_argument("--tars", type=int, default=4)
    i.add_argument("--per-tar", type=int, default=512)
    i.add_argument("--px", type=int, default=160)
    i.add_argument("--shard-size", type=int, default=256)
    i.add_argument("--sample", type=int, default=256, help="images read one by one")
    m = sub.add_parser("memory")
    m.add_argument("--rows", type=int, nargs="+", default=[10000, 1000000])
    m.add_argument("--shard-size", type=int, default=1024)
    m.add_argument("--batches", type=int, default=40)
    for p in (g, s, i, m):
        p.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    res = {"gets": cmd_gets, "speed": cmd_speed, "images": cmd_images, "memory": cmd_memory}[a.cmd](a)
    res["cpu"] = _cpu()
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
