"""Issue 24 items 5-9 and 14: a store from another team cannot make a reader return fill values,
read outside the store, allocate what the store does not hold, or trust a bad cached file; verify
says what an interrupted append left. The corpus (test_hostile_stores.py) runs every command."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import functools  # noqa: E402
import http.server  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cospress.errors import StoreError  # noqa: E402
from cospress.store import StoreReader  # noqa: E402
from tests import hostile_stores as hs  # noqa: E402
from tests.helpers import cli_env, error_line, run_cli  # noqa: E402


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(an int8 store, its image source spec)."""
    tmp = tmp_path_factory.mktemp("base")
    spec = hs.make_images(tmp / "images")
    return hs.base_store(tmp / "store", spec), spec


def _cli_error(capsys, *argv: str) -> str:
    """The one ``error:`` line of the CLI run in-process (``main(argv)``), which must exit 2."""
    from cospress.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert e.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _copy(base, tmp_path: Path, mutate=None) -> Path:
    out = tmp_path / "store"
    shutil.copytree(base[0], out, symlinks=True)
    if mutate is not None:
        mutate(out)
    return out


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder with byte ranges (206), counting whole-file GETs per path in ``server.gets``."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        if "Range" not in self.headers:  # whole files (a cache fetch); ranged reads are not counted
            self.server.gets[self.path] += 1
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        rng = self.headers.get("Range")
        if rng:
            a, b = rng.split("=")[1].split("-")
            start, stop = (
                (len(data) - int(b), len(data)) if a == "" else (int(a), int(b) + 1 if b else len(data))
            )
            data, code = data[start:stop], 206
        else:
            code = 200
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_HEAD(self) -> None:
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(path.stat().st_size))
        self.end_headers()


@pytest.fixture()
def served(tmp_path):
    """(folder served over HTTP, base URL, the server: ``server.gets`` counts GETs per path)."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(RangeHandler, directory=str(root))
    )
    server.gets = Counter()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}", server
    finally:
        server.shutdown()


# ------------------------------------------------------------------------------------ item 5
def test_a_missing_shard_file_is_an_error_naming_it_never_fill_values(base, tmp_path, served):
    store = _copy(base, tmp_path, hs._unlink(hs.LAB1))
    (store / hs.KEYS0).unlink()
    r = StoreReader(store)
    for read in (r.labels, r.valid, r.keys, lambda: r.read_rows([0, 6])):
        with pytest.raises(StoreError, match=r"(labels/c/1|keys/c/0) is missing"):
            read()
    root, url, _ = served  # over HTTP: CLS zeros, labels -1, valid False, keys '' before
    shutil.copytree(base[0], root / "s")
    (root / "s" / hs.CLS1).unlink()
    remote = StoreReader(f"{url}/s")
    with pytest.raises(StoreError, match=r"cls/c/1/0/0 is missing \(deleted, or not uploaded yet\)"):
        remote.read_rows([6], tokens=False)
    np.testing.assert_array_equal(remote.read_rows([0])["cls"], StoreReader(base[0]).read_rows([0])["cls"])
    (root / "s" / hs.LAB1).unlink()
    with pytest.raises(StoreError, match=r"labels/c/1 is missing"):
        StoreReader(f"{url}/s").labels()


# ------------------------------------------------------------------------------------ item 6
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -2.0])
def test_a_nan_inf_or_negative_token_scale_is_refused_at_verify_and_read(base, tmp_path, value, capsys):
    store = _copy(base, tmp_path, hs._scale(value))
    r = StoreReader(store)
    with pytest.raises(
        StoreError, match=r"token_scale/c/1/0/0: token_scale holds .* must be finite and >= 0"
    ):
        r.verify()
    for raw in (False, True):
        with pytest.raises(StoreError, match="token_scale holds"):
            r.read_rows([5], raw=raw)
    assert r.read_rows([0])["tokens"] is not None  # a row of another shard still reads
    line = _cli_error(capsys, "verify", str(store))
    assert "token_scale" in line and "finite" in line


# ------------------------------------------------------------------------------------ item 7
def _alarm(signum, frame):
    raise TimeoutError("still reading after 10 s")


@pytest.mark.parametrize("key", ["../../etc/hostname", "/etc/hostname", "/dev/zero", "cls/../../x"])
def test_verify_refuses_manifest_keys_outside_the_store_at_once(base, tmp_path, key):
    store = _copy(base, tmp_path, hs._metadata_key(key))
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(10)
    try:
        with pytest.raises(StoreError, match="a path outside the store"):
            StoreReader(store).verify()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("target", [hs.OUTSIDE, "/dev/zero"])
def test_a_symlink_out_of_the_store_is_never_followed(base, tmp_path, target):
    store = _copy(base, tmp_path, hs._symlink(hs.LAB1, target))
    for step in (lambda r: r.verify(), lambda r: r.labels()):
        with pytest.raises(StoreError, match=r"labels/c/1 (links outside the store|is not a regular file)"):
            step(StoreReader(store))


# ------------------------------------------------------------------------------------ item 8
def test_a_crafted_20kb_store_fails_in_one_line_before_allocating(base, tmp_path, capsys):
    """It declares 2**22 rows in one shard (manifest, identity and zarr.json agree) in ~22 KB of files;
    before, `export-wds` died with "Unable to allocate" and a traceback."""
    store = _copy(base, tmp_path, hs._huge_shard)
    size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    assert size < 40_000
    for args in (["export-wds", str(store), "--out", str(tmp_path / "wds")], ["verify", str(store)],
                 ["inspect", str(store), "--reference", str(base[0])]):  # fmt: skip
        line = _cli_error(capsys, *args)
        assert "cls/c/0/0/0 is truncated" in line, line


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda p: hs.patch_blosc_nbytes(p, hs.CLS0, (1 << 31) - 1), "blosc header claims 2,147,483,647"),
        (lambda p: hs.patch_blosc_nbytes(p, hs.LAB1, (1 << 31) - 1), "blosc header claims 2,147,483,647"),
        (lambda p: hs.patch_index(p, hs.CLS0, 0, nbytes=1 << 40), "the shard index gives a chunk of"),
        (lambda p: hs.patch_index(p, hs.LAB1, 0, nbytes=1 << 40), "the shard index gives a chunk of"),
        (lambda p: hs.patch_index(p, hs.CLS0, 1, offset=1 << 50), "points past the end of the file"),
    ],
    ids=["blosc-cls", "blosc-labels", "index-nbytes", "index-labels", "index-offset"],
)
def test_shard_indexes_and_codec_headers_are_checked_before_a_read(base, tmp_path, served, mutate, words):
    store = _copy(base, tmp_path, mutate)
    with pytest.raises(StoreError, match=words):  # verify, although every checksum matches
        StoreReader(store).verify()
    r = StoreReader(store)
    with pytest.raises(StoreError, match=words):
        r.read_rows(np.arange(hs.N), tokens=False)
        r.labels()
    root, url, _ = served  # the same through zarr over HTTP (the file's size unknown: its end reads empty)
    shutil.copytree(store, root / "s")
    remote = StoreReader(f"{url}/s")
    with pytest.raises(StoreError, match=f"{words}|a chunk of 0 bytes is shorter than its blosc header"):
        remote.read_rows(np.arange(hs.N), tokens=False)
        remote.labels()


def test_a_projection_is_read_only_at_the_identity_shape(tmp_path):
    spec = hs.make_images(tmp_path / "images")
    store = hs.base_store(tmp_path / "pca", spec, "pca")
    hs._projection_shape(store)
    with pytest.raises(
        StoreError, match=r"token_projection/ has shapes .* not the identity's \[8\] and \[4, 8\]"
    ):
        StoreReader(store).read_rows([0])


# ------------------------------------------------------------------------------------ item 9 + #25
_READ_ALL = """
import sys, numpy as np
from cospress.store import StoreReader
r = StoreReader(sys.argv[1], cache_dir=sys.argv[2])
out = r.read_rows(np.arange(r.num_rows))
np.save(sys.argv[3], out["tokens"].astype(np.float32))
"""


def _reads(url: str, cache: Path, out: Path, n: int = 1) -> list[subprocess.Popen]:
    cmd = [sys.executable, "-c", _READ_ALL, url, str(cache)]
    return [subprocess.Popen([*cmd, str(out / f"{i}.npy")], env=cli_env(), stderr=subprocess.PIPE, text=True)
            for i in range(n)]  # fmt: skip


def test_the_cache_fetches_each_file_once_for_concurrent_processes_and_refetches_a_bad_copy(
    base, tmp_path, served
):
    root, url, server = served
    shutil.copytree(base[0], root / "s")
    cache, out = tmp_path / "cache", tmp_path / "out"
    out.mkdir()
    procs = _reads(f"{url}/s", cache, out, n=2)  # two processes miss every shard file at once
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    shard_gets = {k: v for k, v in server.gets.items() if "/c/" in k}
    assert len(shard_gets) == 3 * 7 and set(shard_gets.values()) == {1}, shard_gets
    want = StoreReader(base[0]).read_rows(np.arange(hs.N))["tokens"]
    for i in range(2):
        np.testing.assert_array_equal(np.load(out / f"{i}.npy"), want.astype(np.float32))
    # a corrupted cached file is fetched again, never used (this process has not checked it yet)
    cached = next(cache.rglob("tokens/c/1/0/0/0"))
    raw = bytearray(cached.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    cached.write_bytes(bytes(raw))
    got = StoreReader(f"{url}/s", cache_dir=str(cache)).read_rows(np.arange(hs.N))["tokens"]
    np.testing.assert_array_equal(got, want)
    assert server.gets["/s/tokens/c/1/0/0/0"] == 2 and server.gets["/s/tokens/c/0/0/0/0"] == 1


def test_a_bad_remote_file_is_never_cached_and_a_fixed_one_is_read(base, tmp_path, served):
    """Issue 24 item 9: the cache kept bad bytes forever; after the remote file was fixed, reads
    through the cache still returned them."""
    root, url, _ = served
    shutil.copytree(base[0], root / "s")
    good = (root / "s" / hs.TOK0).read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x40
    (root / "s" / hs.TOK0).write_bytes(bytes(bad))
    cache = tmp_path / "cache"
    with pytest.raises(StoreError, match=r"tokens/c/0/0/0/0 as fetched has sha256 .* not the manifest's"):
        StoreReader(f"{url}/s", cache_dir=str(cache)).read_rows([0])
    assert not list(cache.rglob("tokens/c/0/0/0/0"))
    (root / "s" / hs.TOK0).write_bytes(good)  # fixed upstream
    got = StoreReader(f"{url}/s", cache_dir=str(cache)).read_rows([0, 1])["tokens"]
    np.testing.assert_array_equal(got, StoreReader(base[0]).read_rows([0, 1])["tokens"])


# ------------------------------------------------------------------------------------ item 14
def test_verify_says_an_append_was_interrupted_and_how_to_finish_or_undo_it(base, tmp_path):
    from cospress.data.sources import open_source
    from cospress.store import StoreLayout
    from cospress.store.append import open_append, plan_append
    from cospress.store.manifest import run_identity

    store = _copy(base, tmp_path)
    more = hs.make_images(tmp_path / "more", n=6, prefix="more")
    m = StoreReader(store).manifest
    layout = StoreLayout.from_manifest(m)

    def append(spec: str) -> None:  # what extract-teacher --append does before its first new shard
        src = open_source(spec)
        ident = {**run_identity(m), "source": src.describe()}
        open_append(plan_append(store, ident, src.keys(), src.labels(), src.describe(), layout))

    append(more)  # ... and then the process dies
    proc = run_cli("verify", str(store), check=False)
    line = error_line(proc)
    assert (
        "--append` was interrupted" in line and "rerun the same `cospress extract-teacher --append`" in line
    )
    assert "corrupted" not in proc.stderr
    assert len(StoreReader(store).keys()) == hs.N  # it still reads as its manifest says
    append(base[1])  # the undo the message gives: --append with the store's own --data
    assert StoreReader(store).verify() == []
    assert json.loads(run_cli("inspect", str(store), "--json").stdout)["counts"]["rows"] == hs.N
