"""The feature store: real zarr on tmp_path, random shard sizes and row counts, seeded data."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import json
import multiprocessing as mp
import pickle
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from cospress.errors import StoreError
from cospress.store import SCHEMA_VERSION, StoreLayout, StoreReader, StoreWriter, make_identity
from cospress.store.manifest import full_identity, shard_file_key
from cospress.store.records import NEW
from cospress.utils import redact_url
from tests.helpers import run_cli

V, D, T, P = 3, 8, 4, 5


def _identity(seed: int = 0, teacher_fp: str = "a" * 64, n: int = 10) -> dict:
    return make_identity(
        teacher={"name": "test_vit", "fingerprint": teacher_fp, "dim": D},
        view_policy={"scale": [0.08, 1.0], "flip": 0.5},
        policy_fingerprint="b" * 64,
        k=V - 1,
        center_view=True,
        seed=seed,
        source={"spec": "folder:x", "keys_sha256": "c" * 64, "count": n},
        param_names=[f"p{i}" for i in range(P)],
    )


def _data(n: int, seed: int, tokens: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    valid = (rng.random(n) > 0.2).astype(np.uint8)
    cls = rng.standard_normal((n, V, D)).astype(np.float16)
    tok = rng.standard_normal((n, V, T, D)).astype(np.float16) if tokens else None
    views = rng.random((n, V, P)).astype(np.float32)
    cls[valid == 0] = 0
    if tok is not None:
        tok[valid == 0] = 0
    keys = [f"img/{seed}_{i:05d}.jpg" for i in range(n)]
    return {
        "cls": cls,
        "tokens": tok,
        "views": views,
        "keys": keys,
        "labels": rng.integers(-1, 10, n),
        "valid": valid,
    }


def _open(path: Path, n: int, shard: int, tokens: bool = True, **kw) -> StoreWriter:
    ident = kw.pop("identity", None) or _identity(n=n)
    return StoreWriter.open(path, ident, StoreLayout(n, shard, V, D, T, P, tokens), **kw)


def _write(w: StoreWriter, data: dict, shard: int) -> dict:
    a, b = w.shard_rows(shard)
    tok = data["tokens"]
    skipped = [
        {"key": data["keys"][i], "reason": f"cannot decode row {i}"}
        for i in range(a, b)
        if not data["valid"][i]
    ]
    return w.write_shard(
        shard,
        cls=data["cls"][a:b],
        tokens=None if tok is None else tok[a:b],
        views=data["views"][a:b],
        keys=data["keys"][a:b],
        labels=data["labels"][a:b],
        valid=data["valid"][a:b],
        skipped=skipped,
    )


def _full_store(path: Path, n: int, shard: int, seed: int, tokens: bool = True) -> dict:
    data = _data(n, seed, tokens)
    w = _open(path, n, shard, tokens)
    for s in np.random.default_rng(seed).permutation(w.num_shards):
        _write(w, data, int(s))
    w.finalize({"timings": {"total_s": 1.0}})
    return data


def _assert_equal(out: dict, data: dict, rows: np.ndarray) -> None:
    np.testing.assert_array_equal(out["cls"], data["cls"][rows])
    np.testing.assert_array_equal(out["views"], data["views"][rows])
    np.testing.assert_array_equal(out["labels"], data["labels"][rows])
    np.testing.assert_array_equal(out["valid"], data["valid"][rows].astype(bool))
    assert out["keys"] == [data["keys"][i] for i in rows]
    if data["tokens"] is not None:
        np.testing.assert_array_equal(out["tokens"], data["tokens"][rows])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roundtrip_random_shards_and_order(tmp_path, seed):
    rng = np.random.default_rng(100 + seed)
    n, shard = int(rng.integers(5, 40)), int(rng.integers(1, 9))
    data = _full_store(tmp_path / "s", n, shard, seed)
    r = StoreReader(tmp_path / "s")
    assert (r.num_rows, r.stored_views, r.dim, r.num_tokens, r.has_tokens) == (n, V, D, T, True)
    assert r.param_names == [f"p{i}" for i in range(P)]
    assert r.keys() == data["keys"]
    np.testing.assert_array_equal(r.labels(), data["labels"])
    np.testing.assert_array_equal(r.valid_rows(), np.flatnonzero(data["valid"]))
    rows = rng.integers(0, n, size=17)  # unsorted, with repeats
    _assert_equal(r.read_rows(rows), data, rows)
    for s in range(r.num_shards):
        a, b = r.manifest["shards"][s]["rows"]
        _assert_equal(r.read_shard(s), data, np.arange(a, b))
    m = r.manifest
    assert m["schema_version"] == SCHEMA_VERSION and m["extra"]["timings"]["total_s"] == 1.0
    n_skipped = int((data["valid"] == 0).sum())
    assert m["counts"] == {"rows": n, "valid": n - n_skipped, "skipped": n_skipped, "shards": r.num_shards}
    assert sorted(s["key"] for s in m["skipped"]) == [
        data["keys"][i] for i in np.flatnonzero(data["valid"] == 0)
    ]
    assert all(s["reason"].startswith("cannot decode") for s in m["skipped"])
    assert r.verify() == []
    assert r.summary()["skipped"] == n_skipped


def test_read_rows_subset_of_views(tmp_path):
    data = _full_store(tmp_path / "s", 13, 4, seed=3)
    r = StoreReader(tmp_path / "s")
    rows = np.array([7, 0, 12, 7, 3])
    views = np.array([[2, 0], [1, 1], [0, 2], [0, 1], [2, 1]])
    out = r.read_rows(rows, views=views)
    idx = np.arange(len(rows))[:, None]
    np.testing.assert_array_equal(out["cls"], data["cls"][rows][idx, views])
    np.testing.assert_array_equal(out["tokens"], data["tokens"][rows][idx, views])
    np.testing.assert_array_equal(out["views"], data["views"][rows][idx, views])
    assert out["cls"].shape == (5, 2, D) and out["tokens"].shape == (5, 2, T, D)
    assert r.read_rows(rows, tokens=False)["tokens"] is None
    with pytest.raises(StoreError, match="view index"):
        r.read_rows([0], views=[[V]])


def test_partial_store_is_refused_and_finalize_lists_missing(tmp_path):
    data = _data(10, 4)
    w = _open(tmp_path / "s", 10, 3)
    _write(w, data, 1)
    _write(w, data, 3)
    with pytest.raises(StoreError, match="has no manifest .*: it is incomplete"):
        StoreReader(tmp_path / "s")
    with pytest.raises(StoreError, match=r"2 of 4 shards are not committed \(0, 2\)"):
        w.finalize()


def test_resume_and_rewrite_is_identical(tmp_path):
    data = _data(11, 5)
    w = _open(tmp_path / "s", 11, 4)
    first = _write(w, data, 0)
    assert w.committed_shards() == {0}
    # A crash mid-shard: files written, no commit. The shard is not committed and rewriting it is exact.
    _write(w, data, 2)
    (tmp_path / "s" / NEW.commit(2)).unlink()
    w2 = _open(tmp_path / "s", 11, 4, create=False)
    assert w2.committed_shards() == {0}
    again = _write(w2, data, 2)
    assert _write(w2, data, 2)["sha256"] == again["sha256"]
    assert _write(w2, data, 0)["sha256"] == first["sha256"]
    _write(w2, data, 1)
    assert w2.committed_shards() == {0, 1, 2}
    w2.finalize()
    _assert_equal(StoreReader(tmp_path / "s").read_rows(np.arange(11)), data, np.arange(11))


@pytest.mark.parametrize(
    ("change", "label"),
    [
        ({"identity": _identity(seed=1)}, "seed"),
        ({"identity": _identity(teacher_fp="f" * 64)}, "teacher fingerprint"),
        ({"shard": 5}, "shard size"),
        ({"tokens": False}, "tokens kept"),
    ],
)
def test_identity_mismatch_names_the_field(tmp_path, change, label):
    _open(tmp_path / "s", 10, 3)
    kw = dict(change)
    shard = kw.pop("shard", 3)
    with pytest.raises(StoreError, match=f"{label}.*--overwrite replaces it"):
        _open(tmp_path / "s", 10, shard, **kw)


def test_overwrite_replaces_a_store_but_never_a_foreign_folder(tmp_path):
    data = _data(6, 6)
    w = _open(tmp_path / "s", 6, 3)
    _write(w, data, 0)
    w2 = _open(tmp_path / "s", 6, 2, overwrite=True, identity=_identity(seed=9))
    assert w2.committed_shards() == set() and w2.num_shards == 3
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    for overwrite in (False, True):
        with pytest.raises(StoreError, match="not a cospress store"):
            _open(foreign, 6, 3, overwrite=overwrite)
    assert (foreign / "holiday.jpg").read_bytes() == b"x"


def test_verify_detects_a_flipped_byte_in_each_array(tmp_path):
    _full_store(tmp_path / "s", 9, 4, seed=7)
    r = StoreReader(tmp_path / "s")
    for name, shape in r.manifest["shapes"].items():
        f = tmp_path / "s" / shard_file_key(name, 1, len(shape))
        original = f.read_bytes()
        broken = bytearray(original)
        broken[len(broken) // 2] ^= 0xFF
        f.write_bytes(bytes(broken))
        bad = r.verify()
        assert [(b["shard"], b["array"]) for b in bad] == [(1, name)]
        assert bad[0]["actual"] not in (None, bad[0]["expected"])
        f.write_bytes(original)
    f.unlink()  # a missing file counts as bad
    assert [(b["shard"], b["array"], b["actual"]) for b in r.verify()] == [(1, "valid", None)]


def _edit_json(path: Path, edit) -> None:
    """Edit a JSON file; a store record (a Zarr group node) is edited in its attributes."""
    raw = json.loads(path.read_text())
    doc = raw.get("attributes") if raw.get("node_type") == "group" else raw
    edit(doc)
    path.write_text(json.dumps(raw, indent=2))


def test_changed_metadata_is_named_by_verify_and_refused_on_read(tmp_path):
    """verify hashes every metadata file (schema 1.3); a reader checks dtype, shape and codecs."""
    p = tmp_path / "s"
    data = _full_store(p, 9, 4, seed=3)
    meta = p / "cls" / "zarr.json"
    original = meta.read_text()
    assert set(StoreReader(p).manifest["metadata_sha256"]) == {
        "zarr.json", NEW.identity, *(f"{a}/zarr.json" for a in ("cls", "tokens", "views", "keys", "labels", "valid")),
        *(NEW.commit(s) for s in range(3)),
    }  # fmt: skip
    meta.write_text(original.replace('"data_type": "float16"', '"data_type": "int16"'))
    r = StoreReader(p)  # opens: verify and inspect still run
    assert [(b["file"], b["shard"]) for b in r.verify()] == [("cls/zarr.json", None)]
    with pytest.raises(StoreError, match=r"cls/zarr.json has data_type int16, the manifest says float16"):
        r.read_rows([0])
    proc = run_cli("verify", str(p), check=False)
    assert proc.returncode == 1 and "corrupted cls/zarr.json" in proc.stdout + proc.stderr
    # a codec change is refused too; so are changed commits and identity, by verify
    meta.write_text(original.replace('"clevel": 1', '"clevel": 5'))
    with pytest.raises(StoreError, match=r"cls/zarr.json has codecs .*not the manifest's"):
        StoreReader(p).read_rows([0])
    meta.write_text(original)
    _edit_json(p / NEW.commit(1), lambda c: c.update(counts={"rows": 4, "valid": 4, "skipped": 0}))
    _edit_json(p / NEW.identity, lambda c: c.update(seed=99))
    bad = StoreReader(p).verify()
    assert sorted(b["file"] for b in bad) == sorted([NEW.commit(1), NEW.identity])
    _assert_equal(StoreReader(p).read_rows(np.arange(9)), data, np.arange(9))


def test_store_of_schema_1_2_still_verifies_and_reads(tmp_path):
    """A 1.2 manifest has no metadata hashes or array encodings: verify covers the shard files, and a
    reader still checks each array's dtype and shape against the manifest."""
    p = tmp_path / "s"
    data = _full_store(p, 7, 3, seed=4)

    def as_1_2(m: dict) -> None:
        m.pop("metadata_sha256"), m.pop("arrays")
        m["schema_version"] = "1.2"

    _edit_json(p / NEW.manifest, as_1_2)
    r = StoreReader(p)
    assert r.verify() == [] and r.manifest["schema_version"] == "1.2"
    _assert_equal(r.read_rows(np.arange(7)), data, np.arange(7))
    _edit_json(p / "views" / "zarr.json", lambda m: m.update(data_type="float64"))
    with pytest.raises(StoreError, match=r"views/zarr.json has data_type float64, the manifest says float32"):
        StoreReader(p).keys()


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("padding", "rows 3-5", "'padding'"),
        ("padding", [[5, 2]], "'padding'"),
        ("skipped", [{"key": 3}], "'skipped'"),
        ("source", "folder:x", "'source' must be an object"),
        ("source", {"spec": 7}, "'source'.'spec'"),
        ("teacher", {"name": "t", "grid": [3]}, "'teacher'.'grid'"),
    ],
)
def test_manifest_fields_are_validated(tmp_path, field, value, words):
    p = tmp_path / "s"
    _full_store(p, 7, 3, seed=5)
    _edit_json(p / NEW.manifest, lambda m: m.update({field: value}))
    with pytest.raises(StoreError, match="the manifest is malformed: " + re.escape(words)):
        StoreReader(p)


def test_unknown_major_is_refused_newer_minor_is_read(tmp_path):
    _full_store(tmp_path / "s", 5, 2, seed=8)
    mpath = tmp_path / "s" / NEW.manifest
    for newer in ("2.7", "1.9"):  # a newer minor of either major this code reads
        _edit_json(mpath, lambda m, v=newer: m.update(schema_version=v))
        assert StoreReader(tmp_path / "s").num_rows == 5
    _edit_json(mpath, lambda m: m.update(schema_version="3.0"))
    with pytest.raises(StoreError, match="schema version 3.0; this cospress reads 1.x and 2.x only"):
        StoreReader(tmp_path / "s")


def test_store_without_tokens(tmp_path):
    data = _full_store(tmp_path / "s", 7, 3, seed=9, tokens=False)
    r = StoreReader(tmp_path / "s")
    assert not r.has_tokens and "tokens" not in r.manifest["shapes"]
    out = r.read_rows(np.arange(7))
    assert out["tokens"] is None
    _assert_equal(out, data, np.arange(7))
    w = _open(tmp_path / "s", 7, 3, tokens=False)
    with pytest.raises(StoreError, match="without tokens"):
        w.write_shard(
            0,
            cls=data["cls"][:3],
            tokens=np.zeros((3, V, T, D)),
            views=data["views"][:3],
            keys=data["keys"][:3],
            labels=data["labels"][:3],
            valid=data["valid"][:3],
            skipped=[],
        )


def test_file_url_with_cache_and_pickle(tmp_path):
    data = _full_store(tmp_path / "s", 12, 5, seed=10)
    r = StoreReader(f"file://{tmp_path / 's'}", cache_dir=str(tmp_path / "cache"))
    rows = np.array([11, 2, 6])
    _assert_equal(r.read_rows(rows), data, rows)
    cached = [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and "/tokens/c/" in str(p)]
    assert len(cached) == 3  # the three shards touched, each fetched once
    r2 = pickle.loads(pickle.dumps(r))
    _assert_equal(r2.read_rows(rows), data, rows)
    assert r.verify() == []


def test_check_identity(tmp_path):
    _full_store(tmp_path / "s", 4, 2, seed=11)
    r = StoreReader(tmp_path / "s")
    r.check_identity(expect_teacher="a" * 64, policy_fingerprint="b" * 64)
    r.check_identity(expect_teacher="test_vit")
    with pytest.raises(StoreError, match="made by teacher test_vit"):
        r.check_identity(expect_teacher="e" * 64)
    with pytest.raises(StoreError, match="view policy"):
        r.check_identity(policy_fingerprint="d" * 64)


def test_server_without_range_support_is_refused(tmp_path):
    _full_store(tmp_path / "s", 4, 2, seed=12)

    class Quiet(http.server.SimpleHTTPRequestHandler):  # ignores Range headers: always 200 + full body
        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path / "s"))
    )
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with pytest.raises(StoreError, match="does not support byte ranges") as e:
            StoreReader(f"http://alice:secret@127.0.0.1:{srv.server_address[1]}/")
        assert "secret" not in str(e.value)
    finally:
        srv.shutdown()
        srv.server_close()


def test_estimate_and_redact():
    layout = StoreLayout(
        num_rows=10, shard_size=4, stored_views=2, dim=4, num_tokens=3, num_params=5, tokens=True
    )
    assert layout.estimate_bytes() == 10 * (2 * 4 * 4 * 2 + 2 * 5 * 4 + 41)
    no_tokens = dataclasses.replace(layout, tokens=False)
    assert no_tokens.estimate_bytes() == 10 * (2 * 4 * 2 + 2 * 5 * 4 + 41)
    assert layout.num_shards == 3 and layout.shard_rows(2) == (8, 10)
    assert redact_url("s3://key:pw@bucket/a?X-Amz-Signature=z") == "s3://bucket/a"
    assert redact_url("/local/path") == "/local/path"


def _write_worker(path: str, n: int, shard_size: int, shards: list[int]) -> None:
    w = _open(Path(path), n, shard_size, create=False)
    data = _data(n, 13)
    for s in shards:
        _write(w, data, s)


def test_two_processes_write_disjoint_shards(tmp_path):
    n, shard = 20, 3
    w = _open(tmp_path / "s", n, shard)  # rank 0 creates, then the "ranks" open it
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(
            target=_write_worker, args=(str(tmp_path / "s"), n, shard, list(range(rank, w.num_shards, 2)))
        )
        for rank in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    assert w.committed_shards() == set(range(w.num_shards))
    w.finalize()
    r = StoreReader(tmp_path / "s")
    _assert_equal(r.read_rows(np.arange(n)), _data(n, 13), np.arange(n))
    assert r.verify() == []


def test_identity_keys_keep_the_order_stage_1_writes():
    """cospress-store.json of a stage 1 run keeps the key order of the stores already on disk."""
    ident = make_identity(
        teacher={"fingerprint": "a"}, view_policy={"flip": 0.5}, policy_fingerprint="b", k=2,
        center_view=True, seed=0, source={"count": 4}, param_names=["p0"], precision="float32",
    )  # fmt: skip
    full = full_identity(ident, StoreLayout(4, 2, 3, 8, 0, 1, False))
    assert list(full) == [
        "format", "schema_version", "teacher", "center_view", "seed", "source", "param_names", "precision",
        "view_policy", "policy_fingerprint", "k", "token_codec", "num_rows", "shard_size", "num_views", "dim",
        "num_tokens", "num_params", "tokens", "shapes", "dtypes",
    ]  # fmt: skip
    assert StoreLayout.from_manifest(full) == StoreLayout(4, 2, 3, 8, 0, 1, False)
