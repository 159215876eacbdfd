"""The parallel shard writer (issue 26): several threads write whole shards; the store is byte for
byte the one a single thread writes, a kill -9 mid-shard resumes, and a shard's cost does not grow
with the shards already written (nothing lists a folder per shard)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cospress.errors import ConfigError
from cospress.extract import ExtractConfig
from cospress.extract.writer import ShardSink
from cospress.store import StoreLayout, StoreReader, StoreWriter, make_identity
from cospress.store.records import NEW, read_record

REPO = Path(__file__).resolve().parents[1]
V, D, T, P = 3, 16, 5, 4


def identity(n: int, codec: str) -> dict:
    return make_identity(
        teacher={"name": "test_vit", "fingerprint": "a" * 64, "dim": D},
        view_policy={"scale": [0.08, 1.0]}, policy_fingerprint="b" * 64, k=V, center_view=False, seed=0,
        source={"spec": "folder:x", "keys_sha256": "c" * 64, "count": n}, param_names=[f"p{i}" for i in range(P)],
        token_codec={"name": codec},
    )  # fmt: skip


def data(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    valid = (rng.random(n) > 0.1).astype(np.uint8)
    return {
        "cls": rng.standard_normal((n, V, D)).astype(np.float16),
        "tokens": rng.standard_normal((n, V, T, D)).astype(np.float16),
        "views": rng.random((n, V, P)).astype(np.float32),
        "keys": [f"k{i:05d}" for i in range(n)],
        "labels": rng.integers(-1, 5, n),
        "valid": valid,
    }


def open_writer(path: Path, n: int, shard: int, codec: str = "fp16") -> StoreWriter:
    layout = StoreLayout(n, shard, V, D, T, P, True, token_codec=codec)
    return StoreWriter.open(path, identity(n, codec), layout)


def write(writer: StoreWriter, d: dict, threads: int, shards: list[int] | None = None) -> None:
    """Every shard (or ``shards``) through a `ShardSink` of ``threads`` threads, as stage 1 does."""
    with ShardSink(writer, d["keys"], list(d["labels"]), threads) as sink:
        for s in range(writer.num_shards) if shards is None else shards:
            a, b = writer.shard_rows(s)
            buf = sink.buffer(s)
            buf.cls[:], buf.tokens[:], buf.views[:], buf.valid[:] = (
                d["cls"][a:b], d["tokens"][a:b], d["views"][a:b], d["valid"][a:b],
            )  # fmt: skip
            sink.filled(s, b - a)


def files(store: Path) -> dict[str, bytes]:
    """Every file of a store; commit records without their time, the manifest left out (it holds times)."""
    out = {}
    for p in sorted(store.rglob("*")):
        rel = p.relative_to(store).as_posix()
        if not p.is_file() or rel in (NEW.manifest, NEW.config):
            continue
        if rel.startswith(NEW.commits + "/shard-"):
            doc = read_record(store, rel)
            doc.pop("written")
            out[rel] = json.dumps(doc, sort_keys=True).encode()
        else:
            out[rel] = p.read_bytes()
    return out


@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_threads_write_the_store_a_single_thread_writes(tmp_path, codec):
    n, shard = 23, 3
    d = data(n, seed=1)
    stores = {}
    for threads in (1, 3):
        w = open_writer(tmp_path / f"t{threads}", n, shard, codec)
        write(w, d, threads)
        w.finalize()
        stores[threads] = files(w.path)
    assert stores[1].keys() == stores[3].keys() and len(stores[1]) > 3 * 8
    assert [k for k in stores[1] if stores[1][k] != stores[3][k]] == []
    r = StoreReader(tmp_path / "t3")
    assert r.verify() == []
    out = r.read_rows(np.arange(n))
    np.testing.assert_array_equal(out["cls"], d["cls"])
    if codec == "fp16":
        np.testing.assert_array_equal(out["tokens"], d["tokens"])
    meta = json.loads((tmp_path / "t3" / "tokens" / "zarr.json").read_text())
    blosc = meta["codecs"][0]["configuration"]["codecs"][1]["configuration"]
    assert (blosc["cname"], blosc["clevel"], blosc["shuffle"]) == ("lz4", 1, "noshuffle")


_KILLER = """
import os, signal, sys
from pathlib import Path
import cospress.store.dest as sw
from tests.test_parallel_writer import data, open_writer, write
victim = sys.argv[2]
real = sw.write_shard_file
def write_shard_file(path, blob):
    blob = blob if isinstance(blob, bytes) else b"".join(blob)  # a shard comes in parts
    if str(path).endswith(victim):  # half the bytes reach the temp file, then the process dies
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).with_name("." + Path(path).name + ".tmp").write_bytes(blob[: len(blob) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, blob)
sw.write_shard_file = write_shard_file
write(open_writer(Path(sys.argv[1]), 29, 3), data(29, seed=2), threads=2)
"""


def test_kill_9_mid_shard_then_resume_gives_the_clean_store(tmp_path):
    n, shard = 29, 3
    d = data(n, seed=2)
    clean = open_writer(tmp_path / "clean", n, shard)
    write(clean, d, 1)
    clean.finalize()
    store = tmp_path / "killed"
    victim = "tokens/c/6/0/0/0"  # shard 6's tokens file
    proc = subprocess.run(
        [sys.executable, "-c", _KILLER, str(store), victim],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    w = open_writer(store, n, shard)  # the rerun: the same command
    done = w.committed_shards()
    assert 6 not in done and len(done) < w.num_shards
    assert (store / "tokens/c/6/0/0/.0.tmp").exists()  # what the kill left
    write(w, d, 2, [s for s in range(w.num_shards) if s not in done])
    w.finalize()
    assert sorted(p.name for p in store.rglob("*.tmp")) == []
    assert files(store) == files(clean.path)
    assert StoreReader(store).verify() == []


_AUDIT = """
import sys
from pathlib import Path
from tests.test_parallel_writer import data, open_writer, write
listed = []
w = open_writer(Path(sys.argv[1]), 40, 1)
d = data(40)
write(w, d, 1, [0])
sys.addaudithook(lambda event, args: listed.append(event) if event in ("os.scandir", "os.listdir", "glob.glob") else None)
write(w, d, 2, list(range(1, 40)))
print(len(listed))
"""


def test_writing_a_shard_lists_no_folder(tmp_path):
    """The old writer globbed each array's folder for stale temp files at every shard: O(S) per shard
    (7.8 -> 27.7 ms per shard over 5,000 shards). Now writing a shard lists nothing."""
    proc = subprocess.run(
        [sys.executable, "-c", _AUDIT, str(tmp_path / "s")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0"


def test_writer_threads_setting():
    assert ExtractConfig().writer_threads == max(1, (os.cpu_count() or 2) // 4)
    assert ExtractConfig(writer_threads=3).writer_threads == 3
    with pytest.raises(ConfigError, match="--writer-threads must be at least 1"):
        ExtractConfig(writer_threads=0).validate()


def test_a_reused_shard_buffer_writes_what_a_fresh_one_writes(tmp_path):
    """A written shard's buffer serves the next shard (no fresh shard-sized arrays for the teacher's
    thread to page-fault in): rows skipped there are zero-filled, the store is the one fresh buffers write."""
    import time

    n, shard = 9, 3
    d = data(n, seed=4)
    d["valid"][:] = 1
    d["valid"][[4, 7, 8]] = 0  # shard 0 whole, shards 1 and 2 skip rows that shard 0's buffer filled
    stores = {}
    for reuse in (False, True):
        w = open_writer(tmp_path / f"reuse{int(reuse)}", n, shard)
        with ShardSink(w, d["keys"], list(d["labels"]), 1) as sink:
            for s in range(w.num_shards):
                a, b = w.shard_rows(s)
                assert sink.buffer(s).reused == (reuse and s > 0)
                items = [{"row": r, "images": True if d["valid"][r] else None, "params": d["views"][r],
                          "reason": "not an image"} for r in range(a, b)]  # fmt: skip
                good = [r for r in range(a, b) if d["valid"][r]]
                sink.add(items, d["cls"][good], d["tokens"][good])
                while sink.committed < s + 1 and sink.error is None:  # written: its buffer is free
                    time.sleep(0.01)
                while not reuse and not sink.free.empty():
                    sink.free.get_nowait()
        w.finalize()
        stores[reuse] = files(w.path)
    assert stores[False] == stores[True]
    out = StoreReader(tmp_path / "reuse1").read_rows(np.arange(n))
    bad = d["valid"] == 0
    assert not out["cls"][bad].any() and not out["tokens"][bad].any()
    np.testing.assert_array_equal(out["tokens"][~bad], d["tokens"][~bad])
