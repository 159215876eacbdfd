"""Sharing stores: merge, append (with a concurrent reader), WebDataset export/import, verify, safety."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import io  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cospress.errors import StoreError  # noqa: E402
from cospress.extract import ExtractConfig, run_extract  # noqa: E402
from cospress.store import SCHEMA_VERSION, StoreLayout, StoreReader, StoreWriter, make_identity  # noqa: E402
from cospress.store import manifest as mf  # noqa: E402
from cospress.store.append import open_append, plan_append  # noqa: E402
from cospress.store.merge import merge_stores  # noqa: E402
from cospress.store.records import LEGACY, NEW, read_record  # noqa: E402
from cospress.store.wds_io import SIDECAR, decode_key, encode_key, export_wds, import_wds  # noqa: E402
from cospress.utils import keys_sha256, sha256_json  # noqa: E402
from tests.helpers import cli_env, make_image_folder, make_tiny_teacher_weights, run_cli  # noqa: E402
from tests.store_helpers import to_legacy  # noqa: E402

V, D, T, P = 3, 8, 4, 5


# --------------------------------------------------------------------------- tiny synthetic stores
def _identity(prefix: str, n: int, teacher_fp: str = "a" * 64) -> dict:
    return make_identity(
        teacher={"name": "test_vit", "fingerprint": teacher_fp, "dim": D},
        view_policy={"scale": [0.08, 1.0], "flip": 0.5},
        policy_fingerprint="b" * 64,
        k=V,
        center_view=False,
        seed=0,
        source={"spec": f"folder:/data/{prefix}", "kind": "folder", "keys_sha256": prefix * 8, "count": n},
        param_names=[f"p{i}" for i in range(P)],
    )


def _rows(prefix: str, n: int, seed: int, tokens: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    valid = (rng.random(n) > 0.25).astype(np.uint8)
    valid[0] = 1
    cls = rng.standard_normal((n, V, D)).astype(np.float16)
    tok = rng.standard_normal((n, V, T, D)).astype(np.float16) if tokens else None
    cls[valid == 0] = 0
    if tok is not None:
        tok[valid == 0] = 0
    return {
        "cls": cls,
        "tokens": tok,
        "views": rng.random((n, V, P)).astype(np.float32),
        "keys": [f"{prefix}/img.{i:04d}.jpg" for i in range(n)],  # dots and slashes: WebDataset-hostile
        "labels": rng.integers(-1, 5, n).astype(np.int64),
        "valid": valid,
    }


def make_store(path: Path, prefix: str, n: int, shard: int, seed: int, tokens: bool = True, **ident) -> dict:
    """A complete store written with the real StoreWriter; returns its rows."""
    data = _rows(prefix, n, seed, tokens)
    w = StoreWriter.open(path, _identity(prefix, n, **ident), StoreLayout(n, shard, V, D, T, P, tokens))
    for s in range(w.num_shards):
        _write(w, s, data, *w.shard_rows(s))
    w.finalize()
    return data


def _write(w: StoreWriter, shard: int, data: dict, a: int, b: int) -> None:
    """Write rows a:b of ``data`` as ``shard`` (its invalid rows recorded as skipped)."""
    skipped = [{"key": data["keys"][i], "reason": f"bad {i}"} for i in range(a, b) if not data["valid"][i]]
    w.write_shard(
        shard,
        cls=data["cls"][a:b],
        tokens=None if data["tokens"] is None else data["tokens"][a:b],
        views=data["views"][a:b],
        keys=data["keys"][a:b],
        labels=data["labels"][a:b],
        valid=data["valid"][a:b],
        skipped=skipped,
    )


def assert_rows_equal(out: dict, data: dict, rows: slice | np.ndarray = slice(None)) -> None:
    for name in ("cls", "views", "labels"):
        np.testing.assert_array_equal(out[name], data[name][rows], err_msg=name)
    np.testing.assert_array_equal(out["valid"], data["valid"][rows].astype(bool))
    assert out["keys"] == list(np.asarray(data["keys"], dtype=object)[rows])
    if data["tokens"] is not None:
        np.testing.assert_array_equal(out["tokens"], data["tokens"][rows])


def _one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr  # one line (logs may come before it)
    for w in words:
        assert w in lines[0], (w, lines[0])


# --------------------------------------------------------------------------- merge
def test_merge_copies_rows_and_verifies(tmp_path):
    a = make_store(tmp_path / "a", "teamA", 11, 4, seed=1)
    b = make_store(tmp_path / "b", "teamB", 7, 3, seed=2)
    run_cli(
        "merge",
        str(tmp_path / "a"),
        f"file://{tmp_path / 'b'}",
        "--out",
        str(tmp_path / "c"),
        "--no-progress",
    )
    r = StoreReader(tmp_path / "c")
    assert r.num_rows == 18 and r.shard_size == 4
    out = r.read_rows(np.arange(18))
    both = {k: np.concatenate([a[k], b[k]]) for k in ("cls", "tokens", "views", "labels", "valid")}
    both["keys"] = a["keys"] + b["keys"]
    assert_rows_equal(out, both)
    m = r.manifest
    assert m["keys_sha256"] == keys_sha256(both["keys"])
    assert m["source"]["kind"] == "merge" and m["source"]["keys_sha256"] == keys_sha256(both["keys"])
    assert [p["spec"] for p in m["source"]["parts"]] == ["folder:/data/teamA", "folder:/data/teamB"]
    assert {s["key"] for s in m["skipped"]} == {
        k for k, v in zip(both["keys"], both["valid"], strict=True) if not v
    }
    assert mf.run_identity(m)["teacher"] == mf.run_identity(StoreReader(tmp_path / "a").manifest)["teacher"]
    assert r.verify() == []
    proc = run_cli("verify", str(tmp_path / "c"))
    assert "every shard checksum matches" in " ".join(proc.stderr.split())


def test_merge_refuses_other_teacher_and_duplicate_keys(tmp_path):
    make_store(tmp_path / "a", "teamA", 5, 2, seed=1)
    make_store(tmp_path / "other", "teamB", 5, 2, seed=2, teacher_fp="f" * 64)
    make_store(tmp_path / "dup", "teamA", 4, 2, seed=3)  # same keys as a
    proc = run_cli(
        "merge",
        str(tmp_path / "a"),
        str(tmp_path / "other"),
        "--out",
        str(tmp_path / "c"),
        "--no-progress",
        check=False,
    )
    _one_line_error(proc, "cannot merge", "teacher fingerprint")
    with pytest.raises(StoreError, match=r"key 'teamA/img.0000.jpg' is in both"):
        merge_stores([str(tmp_path / "a"), str(tmp_path / "dup")], tmp_path / "c2")
    with pytest.raises(StoreError, match="one of the inputs"):
        merge_stores([str(tmp_path / "a"), str(tmp_path / "dup")], tmp_path / "a", overwrite=True)
    assert StoreReader(tmp_path / "a").num_rows == 5  # untouched


# --------------------------------------------------------------------------- append, store level
def test_append_keeps_old_readers_and_hides_unpublished_shards(tmp_path):
    s = tmp_path / "s"
    old = make_store(s, "teamA", 10, 4, seed=4)  # shards of 4, 4, 2 rows
    shard_hash = {p: mf_sha(p) for p in sorted(s.glob("*/c/**/*")) if p.is_file()}
    before = StoreReader(s)  # opened on the old manifest
    new = _rows("teamB", 6, seed=5)
    keys = old["keys"][:3] + new["keys"]  # 3 keys the store has: skipped, not recomputed
    ident = {**_identity("teamB", 9), "source": {"spec": "folder:/x", "keys_sha256": "z", "count": 9}}
    plan = plan_append(s, ident, keys, [1] * 9, ident["source"], StoreLayout(9, 4, V, D, T, P, True))
    assert (plan.old_rows, plan.first_new_row, plan.added, len(plan.keys)) == (10, 12, 6, 18)
    assert plan.keys[10:12] == ["", ""] and list(plan.positions[12:]) == list(range(3, 9))
    w = open_append(plan)
    assert w.committed_shards() == {0, 1, 2} and w.num_shards == 5
    with pytest.raises(StoreError, match="never rewrites"):
        _write(w, 2, old, 8, 10)
    _write(w, 3, new, 0, 4)
    # mid-append: arrays are resized and shard 3 is written, but the manifest is still the old one
    during = StoreReader(s)
    assert during.num_rows == 10 and during.keys() == old["keys"]
    assert_rows_equal(during.read_rows(np.arange(10)), old)
    _write(w, 4, new, 4, 6)
    m = w.finalize()
    assert m["counts"] == {"rows": 18, "valid": int(old["valid"].sum() + new["valid"].sum()),
                           "skipped": int((1 - old["valid"]).sum() + (1 - new["valid"]).sum()),
                           "shards": 5, "padding": 2}  # fmt: skip
    assert m["padding"] == [[10, 12]] and len(m["skipped"]) == m["counts"]["skipped"]
    assert m["source"]["kind"] == "append" and m["source"]["count"] == 16
    assert_rows_equal(before.read_rows(np.arange(10)), old)  # the old reader still works
    after = StoreReader(s)
    assert after.keys() == old["keys"] + ["", ""] + new["keys"]
    assert not after.valid()[10:12].any()
    assert_rows_equal(after.read_rows(np.arange(12, 18)), new)
    assert after.verify() == []
    assert {p: mf_sha(p) for p in shard_hash} == shard_hash  # no old shard file was rewritten
    # a merge of an appended store leaves the padding out
    make_store(tmp_path / "c", "teamC", 3, 2, seed=6)
    merged = merge_stores([str(s), str(tmp_path / "c")], tmp_path / "m")
    assert merged["num_rows"] == 19 and "" not in StoreReader(tmp_path / "m").keys()


def test_schema_1_1_store_with_old_source_hash_reads_verifies_and_appends(tmp_path):
    """Stores of schema 1.1 hash their source's keys as JSON (`sha256_json`); they still read,
    verify and take an append, which keeps the store's (legacy) layout, writes a 1.4 identity and keeps
    the old source as a part."""
    s = tmp_path / "s"
    old = make_store(s, "teamA", 6, 4, seed=8)
    old_hash = sha256_json(old["keys"])

    def as_1_1(doc: dict) -> None:
        doc["source"] = {**doc["source"], "keys_sha256": old_hash}
        for newer in ("metadata_sha256", "arrays", "token_codec"):  # a 1.1 store has none of them
            doc.pop(newer, None)

    to_legacy(s, "1.1", as_1_1)
    assert (s / "manifest.json").is_file() and not (s / "cospress").exists()
    r = StoreReader(s)
    assert r.manifest["schema_version"] == "1.1" and r.verify() == []
    assert_rows_equal(r.read_rows(np.arange(6)), old)
    new = _rows("teamB", 3, seed=9)
    ident = _identity("teamB", 3)
    plan = plan_append(s, ident, new["keys"], [1] * 3, ident["source"], StoreLayout(3, 4, V, D, T, P, True))
    w = open_append(plan)
    _write(w, 2, new, 0, 3)
    m = w.finalize()
    assert m["schema_version"] == LEGACY.schema_version != SCHEMA_VERSION
    assert (s / LEGACY.commit(2)).is_file() and not (s / "cospress").exists()  # the store's own layout
    assert m["source"]["parts"][0]["keys_sha256"] == old_hash
    assert m["source"]["keys_sha256"] == keys_sha256(old["keys"] + new["keys"])
    after = StoreReader(s)
    assert after.verify() == [] and after.keys() == old["keys"] + ["", ""] + new["keys"]
    assert_rows_equal(after.read_rows(np.arange(8, 11)), new)


def mf_sha(path: Path) -> str:
    from cospress.utils import sha256_file

    return sha256_file(path)


# --------------------------------------------------------------------------- append, end to end
READER_SCRIPT = r"""
import hashlib, json, os, sys, time
import numpy as np
from cospress.store import StoreReader

def digest(url):
    r = StoreReader(url)
    out = r.read_rows(np.arange(r.num_rows))
    h = hashlib.sha256()
    for name in ("cls", "tokens", "views", "labels", "valid"):
        h.update(np.ascontiguousarray(out[name]).tobytes())
    h.update("\n".join(out["keys"]).encode())
    return r.num_rows, h.hexdigest()

url, log, stop = sys.argv[1:4]
with open(log, "a") as f:
    while True:
        t0 = time.time()
        try:
            n, d = digest(url)
            rec = {"t0": t0, "t1": time.time(), "rows": n, "digest": d}
        except Exception as e:
            rec = {"t0": t0, "t1": time.time(), "error": repr(e)}
        f.write(json.dumps(rec) + "\n"); f.flush()
        if os.path.exists(stop) or len(sys.argv) > 4:
            break
"""


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return make_tiny_teacher_weights(tmp_path_factory.mktemp("w") / "t.safetensors", img_size=32)


def _cfg(data: Path, out: Path, weights: Path, **kw) -> ExtractConfig:
    base = dict(
        data=f"folder:{data}", teacher="test_vit", weights=str(weights), image_size=32, views=2,
        shard_size=3, batch_size=8, workers=0, precision="fp32", device="cpu", out=str(out),
    )  # fmt: skip
    return ExtractConfig(**{**base, **kw})


def _reader_lines(log: Path) -> list[dict]:
    return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


def test_extract_append_with_a_concurrent_reader(tmp_path, teacher):
    old_imgs = make_image_folder(tmp_path / "old", classes=2, per_class=4, seed=0)  # 8 images
    grown = tmp_path / "grown"
    shutil.copytree(old_imgs, grown)
    extra = make_image_folder(tmp_path / "extra", classes=2, per_class=5, seed=7)
    for f in extra.rglob("*.*"):
        shutil.copy(f, grown / f.parent.name / f"new_{f.name}")
    store = tmp_path / "store"
    run_extract(_cfg(old_imgs, store, teacher))
    script = tmp_path / "reader.py"
    script.write_text(READER_SCRIPT)
    env = cli_env()

    def digest_once(url: Path) -> dict:
        log = tmp_path / f"once-{time.monotonic_ns()}.jsonl"
        subprocess.run([sys.executable, str(script), str(url), str(log), "x", "once"], env=env, check=True)
        return _reader_lines(log)[0]

    old = digest_once(store)
    assert old["rows"] == 8
    log, stop = tmp_path / "reader.jsonl", tmp_path / "stop"
    child = subprocess.Popen([sys.executable, str(script), str(store), str(log), str(stop)], env=env)
    try:
        deadline = time.time() + 60
        while not _reader_lines(log) and time.time() < deadline:
            time.sleep(0.05)
        t_start = time.time()
        summary = run_extract(_cfg(grown, store, teacher, append=True))
        t_end = time.time()
        while not [x for x in _reader_lines(log) if x["t0"] > t_end] and time.time() < deadline:
            time.sleep(0.05)
    finally:
        stop.touch()
        child.wait(timeout=60)
    new = digest_once(store)
    lines = _reader_lines(log)
    assert not [x for x in lines if "error" in x], lines
    seen = {(x["rows"], x["digest"]) for x in lines}
    assert seen <= {(old["rows"], old["digest"]), (new["rows"], new["digest"])}, seen
    assert (old["rows"], old["digest"]) in seen and (new["rows"], new["digest"]) in seen
    assert any(x["t0"] < t_end and x["t1"] > t_start for x in lines)  # a read ran during the append
    # 8 old rows (shard 2 = rows 6-7, short), padding row 8, then the 10 new images from row 9
    assert summary["images"] == 10 and new["rows"] == 19
    r = StoreReader(store)
    assert r.manifest["padding"] == [[8, 9]] and r.manifest["counts"]["padding"] == 1
    keys = r.keys()
    assert keys[8] == "" and all("new_" in k for k in keys[9:]) and r.verify() == []
    # the new rows equal a fresh extract of the grown folder (same views, same teacher)
    ref = tmp_path / "ref"
    run_extract(_cfg(grown, ref, teacher))
    rr = StoreReader(ref)
    pos = {k: i for i, k in enumerate(rr.keys())}
    got = r.read_rows(np.arange(9, 19))
    want = rr.read_rows([pos[k] for k in keys[9:]])
    np.testing.assert_array_equal(got["views"], want["views"])
    np.testing.assert_allclose(got["cls"].astype(np.float32), want["cls"].astype(np.float32), atol=2e-3)
    # appending again adds nothing; another teacher setting is refused with one line
    assert run_extract(_cfg(grown, store, teacher, append=True))["images"] == 0
    assert StoreReader(store).num_rows == 19
    proc = run_cli(
        "extract-teacher", "--data", f"folder:{grown}", "--teacher", "test_vit", "--weights", str(teacher),
        "--image-size", "32", "--views", "3", "--shard-size", "3", "--workers", "0", "--precision", "fp32",
        "--out", str(store), "--append", "--no-progress", check=False,
    )  # fmt: skip
    _one_line_error(proc, "cannot append", "K (random views per image)")


# --------------------------------------------------------------------------- WebDataset
def test_key_encoding_is_reversible_and_dot_free():
    for key in ["a/b.c.jpg", "x%2E.y", "~u/ü ñ.png", "..", "/abs"]:
        enc = encode_key(key)
        assert "." not in enc and "/" not in enc and decode_key(enc) == key


@pytest.mark.parametrize("tokens", [True, False])
def test_wds_round_trip_is_exact(tmp_path, tokens):
    rng = np.random.default_rng(8)
    n, shard = int(rng.integers(9, 20)), int(rng.integers(2, 6))
    make_store(tmp_path / "s", "team", n, shard, seed=9, tokens=tokens)
    if tokens:  # through the CLI
        run_cli("export-wds", str(tmp_path / "s"), "--out", str(tmp_path / "w"), "--samples-per-shard", "4",
                "--no-progress")  # fmt: skip
        run_cli("import-wds", str(tmp_path / "w"), "--out", str(tmp_path / "t"), "--no-progress")
    else:
        export_wds(str(tmp_path / "s"), tmp_path / "w", samples_per_shard=4)
        import_wds(tmp_path / "w", tmp_path / "t")
    tars = sorted((tmp_path / "w").glob("*.tar"))
    assert len(tars) == -(-n // 4)
    with tarfile.open(tars[0]) as tar:
        names = tar.getnames()
    assert names[0].split(".", 1)[1] in ("cls.npy", "json") and names[0].startswith("team%2Fimg%2E0000")
    a, b = StoreReader(tmp_path / "s"), StoreReader(tmp_path / "t")
    assert mf.run_identity(a.manifest) == mf.run_identity(b.manifest)
    assert {k: a.manifest[k] for k in mf.LAYOUT_FIELDS} == {k: b.manifest[k] for k in mf.LAYOUT_FIELDS}
    assert (
        a.manifest["skipped"] == b.manifest["skipped"]
        and a.manifest["keys_sha256"] == b.manifest["keys_sha256"]
    )
    x, y = a.read_rows(np.arange(n)), b.read_rows(np.arange(n))
    for name in ("cls", "tokens", "views", "labels", "valid", "keys"):
        np.testing.assert_array_equal(np.asarray(x[name]), np.asarray(y[name]), err_msg=name)
    for s_a, s_b in zip(a.manifest["shards"], b.manifest["shards"], strict=True):
        assert s_a["sha256"] == s_b["sha256"]  # even the shard files are byte-identical
    assert b.verify() == []


def _tar_with(path: Path, name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE) -> None:
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


@pytest.mark.parametrize(
    "name, kind, match",
    [
        ("../evil.cls.npy", tarfile.REGTYPE, "unsafe member path"),
        ("/etc/evil.cls.npy", tarfile.REGTYPE, "unsafe member path"),
        ("link.cls.npy", tarfile.SYMTYPE, "not a regular file"),
    ],
)
def test_import_refuses_unsafe_tar_members(tmp_path, name, kind, match):
    make_store(tmp_path / "s", "team", 4, 2, seed=10)
    export_wds(str(tmp_path / "s"), tmp_path / "w", samples_per_shard=10)
    tar = tmp_path / "w" / "shard-000000.tar"
    _tar_with(tar, name, kind=kind)
    side = json.loads((tmp_path / "w" / SIDECAR).read_text())
    side["shards"][0]["sha256"] = mf_sha(tar)  # a consistent but hostile export
    (tmp_path / "w" / SIDECAR).write_text(json.dumps(side))
    with pytest.raises(StoreError, match=match):
        import_wds(tmp_path / "w", tmp_path / "t")
    assert not (tmp_path / "evil.cls.npy").exists() and not (tmp_path / "t" / NEW.manifest).exists()


def test_import_refuses_pickles_tampering_and_bad_sidecars(tmp_path):
    make_store(tmp_path / "s", "team", 4, 2, seed=11)
    export_wds(str(tmp_path / "s"), tmp_path / "w", samples_per_shard=10)
    w = tmp_path / "w"
    tar = w / "shard-000000.tar"
    original, side = tar.read_bytes(), (w / SIDECAR).read_text()
    tar.write_bytes(original[:600] + bytes([original[600] ^ 1]) + original[601:])
    with pytest.raises(StoreError, match="does not match its sha256"):
        import_wds(w, tmp_path / "t")
    # an object array saved with pickle is refused, never unpickled
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    meta = {"key": "team/img.0000.jpg", "label": 1, "valid": True, "views": [[0.0] * P] * V}
    members = {"cls.npy": buf.getvalue(), "tokens.npy": buf.getvalue(), "json": json.dumps(meta).encode()}
    _replace_first_sample(w, side, members)
    with pytest.raises(StoreError, match="is not a plain .npy array"):
        import_wds(w, tmp_path / "t2")
    bad = json.loads(side)
    bad["identity"]["num_views"] = "three"
    (w / SIDECAR).write_text(json.dumps(bad))
    with pytest.raises(StoreError, match="'num_views' must be integer"):
        import_wds(w, tmp_path / "t3")
    bad = json.loads(side)
    bad["shards"][0]["name"] = "../shard-000000.tar"
    (w / SIDECAR).write_text(json.dumps(bad))
    with pytest.raises(StoreError, match="plain tar file"):
        import_wds(w, tmp_path / "t4")


def _npy_with_header(shape: tuple, dtype: str = "<f2", data: bytes = b"\0" * 64) -> bytes:
    """.npy bytes whose header declares ``shape`` whatever data follows (a crafted member)."""
    from numpy.lib import format as npy_format

    buf = io.BytesIO()
    npy_format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue() + data


def _replace_first_sample(w: Path, side: str, members: dict[str, bytes]) -> None:
    tar = w / "shard-000000.tar"
    with tarfile.open(tar, "w") as t:
        for suffix, data in members.items():
            info = tarfile.TarInfo(f"team%2Fimg%2E0000%2Ejpg.{suffix}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    (w / SIDECAR).write_text(side.replace(json.loads(side)["shards"][0]["sha256"], mf_sha(tar)))


def test_import_checks_npy_headers_and_member_sizes_before_reading(tmp_path):
    """A member declaring shape (2**42,) is refused from its header (no allocation); a member larger
    than a sample can be is refused before it is read."""
    make_store(tmp_path / "s", "team", 4, 2, seed=11)
    w = tmp_path / "w"
    export_wds(str(tmp_path / "s"), w, samples_per_shard=10)
    side = (w / SIDECAR).read_text()
    meta = json.dumps(
        {"key": "team/img.0000.jpg", "label": 1, "valid": True, "views": [[0.0] * P] * V}
    ).encode()
    good_tokens = _npy_with_header((V, T, D), data=b"\0" * (V * T * D * 2))
    huge = _npy_with_header((2**42,))
    _replace_first_sample(w, side, {"cls.npy": huge, "tokens.npy": good_tokens, "json": meta})
    with pytest.raises(StoreError, match=r"cls.npy is float16 \[4398046511104\], expected float16 \[3, 8\]"):
        import_wds(w, tmp_path / "t1")
    big = _npy_with_header((V, D), data=b"\0" * (V * D * 2 + (1 << 17)))
    _replace_first_sample(w, side, {"cls.npy": big, "tokens.npy": good_tokens, "json": meta})
    with pytest.raises(StoreError, match=r"cls.npy' is \d+ bytes, more than the \d+ a sample of this store"):
        import_wds(w, tmp_path / "t2")
    short = _npy_with_header((V, D), data=b"\0" * 10)
    _replace_first_sample(w, side, {"cls.npy": short, "tokens.npy": good_tokens, "json": meta})
    with pytest.raises(StoreError, match="cls.npy holds 10 data bytes, not 48"):
        import_wds(w, tmp_path / "t3")
    wrong = _npy_with_header((V, D), dtype="<i2", data=b"\0" * (V * D * 2))
    _replace_first_sample(w, side, {"cls.npy": wrong, "tokens.npy": good_tokens, "json": meta})
    with pytest.raises(StoreError, match=r"cls.npy is int16 \[3, 8\], expected float16"):
        import_wds(w, tmp_path / "t4")


# --------------------------------------------------------------------------- verify, malformed, partial
def test_cli_verify_detects_a_flipped_byte_in_any_shard(tmp_path):
    make_store(tmp_path / "s", "team", 9, 3, seed=12)
    files = sorted(p for p in (tmp_path / "s").glob("*/c/**/*") if p.is_file())
    assert len(files) == 6 * 3  # every array, every shard
    rng = np.random.default_rng(12)
    reader = StoreReader(tmp_path / "s")
    for f in files:
        original = f.read_bytes()
        raw = bytearray(original)
        raw[int(rng.integers(len(raw)))] ^= 1 << int(rng.integers(8))
        f.write_bytes(bytes(raw))
        rel = f.relative_to(tmp_path / "s").as_posix().split("/")
        assert [(b["array"], b["shard"]) for b in reader.verify()] == [(rel[0], int(rel[2]))]
        f.write_bytes(original)
    assert reader.verify() == []
    f = files[int(rng.integers(len(files)))]
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    f.write_bytes(bytes(raw))
    proc = run_cli("verify", str(tmp_path / "s"), check=False)
    rel = f.relative_to(tmp_path / "s").as_posix().split("/")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    text = " ".join(proc.stderr.split())
    assert f"corrupted {'/'.join(rel)} (shard {rel[2]})" in text and "verify failed: 1 corrupted" in text


def test_partial_store_and_malformed_manifest_are_one_line_errors(tmp_path):
    make_store(tmp_path / "s", "team", 5, 2, seed=13)
    partial = tmp_path / "partial"
    shutil.copytree(tmp_path / "s", partial)
    (partial / NEW.manifest).unlink()  # an upload cut short: the manifest goes last
    _one_line_error(run_cli("verify", str(partial), check=False), "has no manifest", "finish the upload")
    m = read_record(tmp_path / "s", NEW.manifest)
    cases = [
        ({k: v for k, v in m.items() if k != "shards"}, "required key 'shards' is missing"),
        ({**m, "num_rows": "5"}, "'num_rows' must be integer"),
        ({**m, "tokens": 1}, "'tokens' must be boolean"),
        ({**m, "shards": m["shards"][:1]}, "'shards' lists 1 shards, the layout needs 3"),
        ({**m, "shapes": {**m["shapes"], "cls": [5, 1, 1]}}, "'shapes'"),
        ([1, 2], "not a JSON object"),
    ]
    for doc, match in cases:
        (partial / NEW.manifest).write_text(
            json.dumps({"zarr_format": 3, "node_type": "group", "attributes": doc})
        )
        with pytest.raises(StoreError, match=match) as e:
            StoreReader(partial)
        assert "\n" not in str(e.value) and "malformed" in str(e.value)
    _one_line_error(run_cli("inspect", str(partial), check=False), "malformed")
