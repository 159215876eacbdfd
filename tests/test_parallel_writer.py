"""The parallel shard writer (issue 26): several threads or writer processes write whole shards; the
store is byte for byte the one a single thread writes, a kill -9 mid-shard resumes (of the run, or of
one writer process), and a shard's cost does not grow with the shards already written (nothing lists
a folder per shard)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cospress.errors import ConfigError, StoreError
from cospress.extract import ExtractConfig
from cospress.extract.writer import ShardSink
from cospress.extract.writer_proc import processes_supported
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


def write(
    writer: StoreWriter, d: dict, threads: int, shards: list[int] | None = None, kind: str = "thread"
) -> None:
    """Every shard (or ``shards``) through a `ShardSink` of ``threads`` writers (threads, or processes
    with ``kind="process"``), as stage 1 does."""
    with ShardSink(writer, d["keys"], list(d["labels"]), threads, kind) as sink:
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


needs_processes = pytest.mark.skipif(not processes_supported(), reason="writer processes need Linux")


@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_threads_and_processes_write_the_store_a_single_thread_writes(tmp_path, codec):
    n, shard = 23, 3
    d = data(n, seed=1)
    stores = {}
    writers = [("thread", 1), ("thread", 3)] + [("process", 2)] * processes_supported()
    for kind, count in writers:
        w = open_writer(tmp_path / f"{kind}{count}", n, shard, codec)
        write(w, d, count, kind=kind)
        w.finalize()
        stores[kind, count] = files(w.path)
    one = stores["thread", 1]
    assert len(one) > 3 * 8
    for other in stores.values():
        assert other.keys() == one.keys()
        assert [k for k in one if one[k] != other[k]] == []
    r = StoreReader(w.path)
    assert r.verify() == []
    out = r.read_rows(np.arange(n))
    np.testing.assert_array_equal(out["cls"], d["cls"])
    if codec == "fp16":
        np.testing.assert_array_equal(out["tokens"], d["tokens"])
    meta = json.loads((w.path / "tokens" / "zarr.json").read_text())
    blosc = meta["codecs"][0]["configuration"]["codecs"][1]["configuration"]
    assert (blosc["cname"], blosc["clevel"], blosc["shuffle"]) == ("lz4", 1, "noshuffle")


# Loaded as sitecustomize by the run and its writer processes: the victim file's writer leaves half of it
# in the temp file, then SIGKILLs itself ("writer": a writer thread's is the run itself) or the run that
# started it ("run": the writer process must die with it, not finish the shard 5 s later).
_PATCH = """
import os, signal, time
from pathlib import Path
import cospress.store.dest as sw
real = sw.write_shard_file
def write_shard_file(path, blob):
    blob = blob if isinstance(blob, bytes) else b"".join(blob)  # a shard comes in parts
    if str(path).endswith(os.environ["TEST_VICTIM"]):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).with_name("." + Path(path).name + ".tmp").write_bytes(blob[: len(blob) // 2])
        Path(os.environ["TEST_PIDFILE"]).write_text(str(os.getpid()))
        os.kill(os.getpid() if os.environ["TEST_KILL"] == "writer" else os.getppid(), signal.SIGKILL)
        time.sleep(5)
    return real(path, blob)
sw.write_shard_file = write_shard_file
"""
_RUN = """
import sys
from pathlib import Path
from tests.test_parallel_writer import data, open_writer, write
write(open_writer(Path(sys.argv[1]), 29, 3), data(29, seed=2), 2, kind=sys.argv[2])
"""


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z")  # a zombie is dead
    except FileNotFoundError:
        return True


def _kill_mid_shard(tmp_path: Path, kind: str, who: str) -> tuple[subprocess.CompletedProcess, int]:
    """Run the 29-row store with 2 writers of ``kind`` into tmp_path/killed; shard 6's tokens file is
    half written, then its writer (``who="writer"``) or the run (``"run"``) is SIGKILLed. Returns the
    run and the pid of the victim file's writer."""
    site, pidfile = tmp_path / "site", tmp_path / "victim.pid"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_PATCH)
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{REPO}", TEST_KILL=who, TEST_PIDFILE=str(pidfile))
    env["TEST_VICTIM"] = "tokens/c/6/0/0/0"  # shard 6's tokens file
    proc = subprocess.run(
        [sys.executable, "-c", _RUN, str(tmp_path / "killed"), kind],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return proc, int(pidfile.read_text())


def _resume_gives_the_clean_store(tmp_path: Path, kind: str) -> None:
    """The rerun after `_kill_mid_shard`: shard 6 uncommitted with its temp file left, then the store
    the clean run writes, byte for byte."""
    n, shard, store = 29, 3, tmp_path / "killed"
    d = data(n, seed=2)
    clean = open_writer(tmp_path / "clean", n, shard)
    write(clean, d, 1)
    clean.finalize()
    w = open_writer(store, n, shard)  # the rerun: the same command
    done = w.committed_shards()
    assert 6 not in done and len(done) < w.num_shards
    assert (store / "tokens/c/6/0/0/.0.tmp").exists()  # what the kill left
    write(w, d, 2, [s for s in range(w.num_shards) if s not in done], kind=kind)
    w.finalize()
    assert sorted(p.name for p in store.rglob("*.tmp")) == []
    assert files(store) == files(clean.path)
    assert StoreReader(store).verify() == []


def test_kill_9_mid_shard_then_resume_gives_the_clean_store(tmp_path):
    proc, _ = _kill_mid_shard(tmp_path, "thread", "writer")  # a writer thread's kill is the run's
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    _resume_gives_the_clean_store(tmp_path, "thread")


@needs_processes
@pytest.mark.parametrize("who", ["writer", "run"])
def test_a_killed_writer_process_or_run_resumes_to_the_clean_store(tmp_path, who):
    """kill -9 of one writer process mid-shard: the run stops with one line naming it and the shard; kill
    -9 of the run: its writer processes die with it (never committing a shard after it). Either way
    the rerun completes the store the clean run writes."""
    import time

    proc, pid = _kill_mid_shard(tmp_path, "process", who)
    if who == "writer":
        assert proc.returncode == 1, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert "shard writer process" in last and "died (signal SIGKILL) while writing shard 6" in last, last
        assert "rerun the same command" in last
    else:
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        deadline = time.monotonic() + 3  # well before the victim's 5 s sleep ends
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(pid), "a writer process outlived the run"
        time.sleep(0.5)
    _resume_gives_the_clean_store(tmp_path, "process")


@needs_processes
def test_a_write_error_in_a_writer_process_is_raised_by_the_run(tmp_path):
    """What a writer process raises (here: rewriting a shard an append protects) is the run's error, as
    it would be from a thread; the shards before it are committed."""
    n, shard = 9, 3
    d = data(n)
    w = open_writer(tmp_path / "s", n, shard)
    write(w, d, 1, [0])
    w.protected_shards = 1
    with pytest.raises(StoreError, match="shard 0 of .* is published in its manifest"):
        write(w, d, 2, [1, 0, 2], kind="process")
    assert {1} <= w.committed_shards()


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


def test_writers_setting():
    assert ExtractConfig().writers == max(1, (os.cpu_count() or 2) // 4)
    assert ExtractConfig(writers=3).writers == 3
    assert ExtractConfig(writers=1).writer_kind_used() == "thread"
    assert ExtractConfig(writers=3).writer_kind_used() == ("process" if processes_supported() else "thread")
    assert ExtractConfig(writers=3, writer_kind="thread").writer_kind_used() == "thread"
    assert ExtractConfig(writers=1, writer_kind="process").writer_kind_used() == "process"
    with pytest.raises(ConfigError, match="--writers must be at least 1"):
        ExtractConfig(writers=0).validate()
    from cospress.config import from_dict

    with pytest.raises(ConfigError, match="fork"):
        from_dict(ExtractConfig, {"writer_kind": "fork"})


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
