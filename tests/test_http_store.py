"""Reading a store over HTTP from a real nginx on 127.0.0.1 (byte ranges): inspect, verify, rows, distill."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import functools  # noqa: E402
import http.server  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cospress.errors import StoreError  # noqa: E402
from cospress.store import StoreReader  # noqa: E402
from cospress.store.records import NEW  # noqa: E402
from tests.helpers import (  # noqa: E402
    assert_same_losses,
    distill_train_losses,
    error_line,
    extract_tiny_store,
    make_image_folder,
    make_tiny_teacher_weights,
    run_cli,
)

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
pytestmark = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (Debian package nginx-light/nginx)"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + 20
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited: {log.read_text() if log.exists() else ''}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("nginx did not start listening within 20 s")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(root folder served by nginx, base URL). Folders placed in root are served at URL/<name>/."""
    tmp = tmp_path_factory.mktemp("nginx")
    root = tmp / "www"
    root.mkdir()
    port = _free_port()
    temps = "\n".join(
        f"  {name}_temp_path {tmp / name};" for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"""daemon off;
master_process off;
worker_processes 1;
pid {tmp / "nginx.pid"};
error_log {tmp / "error.log"} warn;
events {{ worker_connections 64; }}
http {{
  access_log off;
{temps}
  default_type application/octet-stream;
  server {{ listen 127.0.0.1:{port}; root {root}; }}
}}
"""
    )
    proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(tmp)], stderr=subprocess.PIPE)
    try:
        _wait_port(port, proc, tmp / "error.log")
        yield root, f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("img"), classes=2, per_class=8, seed=3)


@pytest.fixture(scope="module")
def store(tmp_path_factory, images, served) -> tuple[Path, str]:
    """A store extracted with a tiny random-init teacher; (local path, its HTTP URL)."""
    weights = make_tiny_teacher_weights(tmp_path_factory.mktemp("w") / "t.safetensors", img_size=32)
    root, base = served
    return extract_tiny_store(images, weights, root / "store"), f"{base}/store"


def test_cli_inspect_and_verify_over_http(store, tmp_path):
    local, url = store
    proc = run_cli("inspect", url, "--json")
    summary = json.loads(proc.stdout)
    assert summary["url"] == url and summary["shards"] == 4 and summary["counts"]["rows"] == 16
    assert summary["teacher"]["name"] == "test_vit"
    proc = run_cli("verify", url, "--cache-dir", str(tmp_path / "cache"))
    assert "every shard checksum matches" in " ".join(proc.stderr.split())


def test_rows_over_http_equal_the_local_copy(store, tmp_path):
    local, url = store
    a = StoreReader(local)
    rows = np.random.default_rng(0).permutation(a.num_rows)
    want = a.read_rows(rows)
    for cache in (None, str(tmp_path / "cache")):
        b = StoreReader(url, cache_dir=cache)
        assert b.manifest == a.manifest and b.keys() == a.keys()
        got = b.read_rows(rows)
        views = np.tile([[3, 1]], (len(rows), 1))
        sub_a, sub_b = a.read_rows(rows, views=views), b.read_rows(rows, views=views)
        for name in ("cls", "tokens", "views", "labels", "valid"):
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
            np.testing.assert_array_equal(sub_b[name], sub_a[name], err_msg=name)
        assert got["keys"] == want["keys"]
    assert any((tmp_path / "cache").rglob("tokens/c/*/0/0/0"))  # the cache holds whole shard files


def test_verify_over_http_finds_a_flipped_byte_and_refuses_a_partial_upload(store, served, tmp_path):
    local, _ = store
    root, base = served
    copy = root / "flipped"
    shutil.copytree(local, copy)
    target = copy / "tokens" / "c" / "2" / "0" / "0" / "0"
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 3] ^= 0x04
    target.write_bytes(bytes(raw))
    proc = run_cli("verify", f"{base}/flipped", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    text = " ".join(proc.stderr.split())
    assert "corrupted tokens/c/2/0/0/0 (shard 2)" in text and "verify failed: 1 corrupted" in text
    (copy / NEW.manifest).unlink()  # as if the upload stopped before its last file
    line = error_line(run_cli("verify", f"{base}/flipped", check=False))
    assert "has no manifest" in line and "finish the upload" in line


def test_server_without_ranges_is_a_clear_cli_error_without_credentials(store):
    local, _ = store

    class Plain(http.server.SimpleHTTPRequestHandler):  # ignores Range: always 200 + the whole file
        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Plain, directory=str(local)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://alice:s3cr3t-pw@127.0.0.1:{srv.server_address[1]}"
        line = error_line(run_cli("inspect", url, check=False))
        assert "does not support byte ranges" in line and "s3cr3t-pw" not in line and "alice" not in line
    finally:
        srv.shutdown()
        srv.server_close()


def test_credentials_never_appear_in_errors(store, served):
    _, base = served
    port = _free_port()  # nothing listens there
    url = f"http://bob:hunter2-pw@127.0.0.1:{port}/store?token=abc123"
    with pytest.raises(StoreError) as e:
        StoreReader(url)
    msg = str(e.value)
    assert "cannot read the store http://127.0.0.1" in msg and "hunter2" not in msg and "abc123" not in msg
    proc = run_cli("verify", url, check=False)
    line = error_line(proc)
    assert "hunter2" not in proc.stderr + proc.stdout and "abc123" not in proc.stderr and "bob" not in line
    # and credentials in a URL nginx serves (no auth configured) still read, without being shown
    host = base.removeprefix("http://")
    r = StoreReader(f"http://bob:hunter2-pw@{host}/store")
    assert r.num_rows == 16 and "hunter2" not in r.display and "hunter2" not in json.dumps(r.summary())
    for cmd in ("verify", "inspect"):
        proc = run_cli(cmd, f"http://bob:hunter2-pw@{host}/store")
        assert "hunter2" not in proc.stdout + proc.stderr and f"{host}/store" in proc.stdout + proc.stderr


def test_distill_over_http_equals_local(store, images, tmp_path):
    local, url = store
    a = distill_train_losses(str(local), tmp_path / "local", images, None)
    b = distill_train_losses(url, tmp_path / "http", images, str(tmp_path / "cache"))
    assert any((tmp_path / "cache").rglob("cls/c/*/0/0"))  # the targets came over HTTP, via the cache
    assert_same_losses(a, b)


def test_codec_and_legacy_stores_over_http_equal_local(store, images, served, tmp_path):
    """int8 and pca stores decode over HTTP as locally (the projection read by byte range too); a
    store of the pre-2.0 layout (records as root files) reads and verifies over HTTP."""
    from tests.store_helpers import to_legacy

    root, base = served
    weights = make_tiny_teacher_weights(tmp_path / "t.safetensors", img_size=32)
    rows = np.random.default_rng(1).permutation(16)
    views = np.tile([[2, 0]], (16, 1))
    for name in ("int8", "pca:8"):
        local = extract_tiny_store(images, weights, root / name.replace(":", "-"), token_codec=name)
        a, b = StoreReader(local), StoreReader(f"{base}/{local.name}", cache_dir=str(tmp_path / "cache"))
        assert b.manifest["token_codec"] == a.manifest["token_codec"] and b.verify() == []
        np.testing.assert_array_equal(
            b.read_rows(rows, views=views)["tokens"], a.read_rows(rows, views=views)["tokens"]
        )
        np.testing.assert_array_equal(
            b.read_rows(rows, raw=True)["token_scale"], a.read_rows(rows, raw=True)["token_scale"]
        )
    legacy = root / "legacy"
    shutil.copytree(store[0], legacy)
    to_legacy(legacy, "1.3")
    r = StoreReader(f"{base}/legacy")
    assert r.manifest["schema_version"] == "1.3" and r.verify() == []
    np.testing.assert_array_equal(
        r.read_rows(rows)["tokens"], StoreReader(store[0]).read_rows(rows)["tokens"]
    )
