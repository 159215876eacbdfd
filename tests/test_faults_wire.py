"""Faults on the wire (issue 24, item 4): a `wds:` source and a store read over HTTP (and S3 through a
fault-injecting proxy in front of moto) retry 500s, resets, truncated bodies and slow answers with
backoff, then fail in one line; a failed read during extract-teacher is never a skipped image, and a
rerun extracts again the shards an older cospress recorded as skipped for a read failure."""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from cospress import netio  # noqa: E402
from cospress.data.sources import open_source  # noqa: E402
from cospress.errors import NetworkError  # noqa: E402
from cospress.store import StoreReader  # noqa: E402
from tests.faultsrv import FaultServer  # noqa: E402
from tests.helpers import extract_tiny_store, make_image_folder, make_tiny_teacher_weights, run_cli  # noqa: E402

FAULTS = ("500", "503", "reset", "truncate", "slow:1.5")


@pytest.fixture(autouse=True)
def _short_retries(monkeypatch):
    """Short backoffs and timeouts: a test waits milliseconds, not the defaults' seconds."""
    monkeypatch.setenv("COSPRESS_IO_ATTEMPTS", "4")
    monkeypatch.setenv("COSPRESS_IO_BACKOFF", "0.01")
    monkeypatch.setenv("COSPRESS_IO_TIMEOUT", "0.5")


def make_tar(path: Path, n: int, seed: int, labels: bool = True) -> None:
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
            members = [(f"s{seed}_{i:03d}.png", buf.getvalue())]
            if labels:
                members.append((f"s{seed}_{i:03d}.cls", b"%d" % (i % 2)))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("www")
    for s in range(len(FAULTS) + 1):
        make_tar(root / f"shard-{s:03d}.tar", 3, s)
    return root


@pytest.fixture()
def server(shards):
    srv = FaultServer(shards)
    yield srv
    srv.close()


def test_transient_or_permanent():
    import aiohttp

    assert netio.transient(ConnectionResetError()) and netio.transient(TimeoutError())
    assert netio.transient(netio.ShortRead("3 of 9 bytes"))
    assert not netio.transient(FileNotFoundError("x")) and not netio.transient(PermissionError())
    assert not netio.transient(ValueError("bad data")) and not netio.transient(NetworkError("x"))
    info = aiohttp.RequestInfo(aiohttp.client.URL("http://h/x"), "GET", {}, aiohttp.client.URL("http://h/x"))
    for status, retried in ((500, True), (503, True), (429, True), (404, False), (403, False)):
        e = aiohttp.ClientResponseError(info, (), status=status)
        assert netio.transient(e) is retried, status
    try:  # fsspec's http reports a 5xx on open as FileNotFoundError from the response error
        raise FileNotFoundError("http://h/x") from aiohttp.ClientResponseError(info, (), status=500)
    except FileNotFoundError as e:
        assert netio.transient(e)


def test_wds_reads_retry_each_fault(server, shards):
    """Each kind of fault, on the index read and on an image read, is retried: the bytes are right."""
    local = open_source(f"wds:{shards}/shard-{{000..00{len(FAULTS)}}}.tar")
    for s, fault in enumerate(FAULTS):  # on the shard index at open
        server.add(fault, match=f"shard-{s:03d}")
    src = open_source(f"wds:{server.url}/shard-{{000..00{len(FAULTS)}}}.tar")
    assert src.keys() == local.keys() and src.labels() == local.labels()
    assert server.pending() == 0
    for s, fault in enumerate(FAULTS, start=1):  # on an image read of shard s
        server.add(fault, match=f"shard-{s:03d}", ranged=True)
        i = 3 * s + 1
        t0 = time.perf_counter()
        assert src.read_bytes(i) == local.read_bytes(i), fault
        assert server.pending() == 0, fault
        assert time.perf_counter() - t0 < 10, fault


def test_wds_read_fails_in_one_line_after_its_retries(server, shards, monkeypatch):
    src = open_source(f"wds:{server.url}/shard-{{000..001}}.tar")
    server.add("500", match="shard-001", times=None, ranged=True)
    before = len(server.log)
    t0 = time.perf_counter()
    with pytest.raises(NetworkError) as err:
        src.read_bytes(4)
    msg = str(err.value)
    assert "\n" not in msg and "after 4 attempts" in msg and "shard-001.tar" in msg, msg
    assert "500" in msg and time.perf_counter() - t0 < 10
    assert sum(1 for e in server.log[before:] if e[3] == "500") == 4
    server.clear()
    monkeypatch.setenv("COSPRESS_IO_ATTEMPTS", "zero")
    with pytest.raises(Exception, match="COSPRESS_IO_ATTEMPTS='zero' is not a number"):
        src.read_bytes(5)


def test_store_reads_over_http_retry_each_fault_and_then_fail_in_one_line(tmp_path):
    images = make_image_folder(tmp_path / "img", classes=2, per_class=4)
    weights = make_tiny_teacher_weights(tmp_path / "t.safetensors", img_size=32)
    store = extract_tiny_store(images, weights, tmp_path / "www" / "store")
    want = StoreReader(store).read_rows(np.arange(8))
    srv = FaultServer(tmp_path / "www")
    try:
        # each kind of fault once, on opening (the manifest) and on the shard reads
        places = ("/manifest/", "/cls/c/1/", "/tokens/c/", "/views/c/", "/keys/c/")
        for fault, where in zip(FAULTS, places, strict=True):
            srv.add(fault, match=where)
        reader = StoreReader(f"{srv.url}/store")
        got = reader.read_rows(np.arange(8))
        assert srv.pending() == 0
        for name in ("cls", "views", "tokens", "labels", "valid"):
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
        assert got["keys"] == want["keys"]
        assert reader.verify() == []
        srv.add("reset", match="/store/views/", times=None)
        with pytest.raises(NetworkError, match=r"views/.* \(after 4 attempts\)") as err:
            StoreReader(f"{srv.url}/store").read_rows([1])
        assert "\n" not in str(err.value)
        proc = run_cli("verify", f"{srv.url}/store", check=False)  # the CLI: one line, no traceback
        srv.clear()
    finally:
        srv.close()
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "views/" in errors[0] and "after 4 attempts" in errors[0], text
    _stream_reads_retry(tmp_path / "www", StoreReader(store).read_shard(1))


def _stream_reads_retry(www: Path, want: dict) -> None:
    """The stream reader of stage 2 (whole shard files) retries too, then fails in one line."""
    from cospress.store.stream import StreamReader

    srv = FaultServer(www)
    try:
        reader = StreamReader(f"{srv.url}/store", ("cls", "views"))
        for fault, where in zip(
            FAULTS, ("/cls/zarr", "/views/zarr", "/cls/c/1", "/views/c/1", "/cls/c/1"), strict=True
        ):
            srv.add(fault, match=where)
        files = reader.fetch(1)
        assert srv.pending() == 0
        for row in range(len(want["keys"])):
            np.testing.assert_array_equal(files["views"].read((row,)), want["views"][row])
            np.testing.assert_array_equal(files["cls"].read((row,)), want["cls"][row])
        srv.add("503", match="/cls/c/0", times=None)
        with pytest.raises(NetworkError, match=r"cls/c/0.* \(after 4 attempts\)"):
            reader.fetch(0)
    finally:
        srv.close()


def _extract(spec: str, out: Path, weights: Path, *extra: str):
    args = ["--teacher", "test_vit", "--weights", str(weights), "--image-size", "32", "--views", "2"]
    args += ["--shard-size", "3", "--precision", "fp32", "--no-progress", "--device", "cpu", *extra]
    return run_cli("extract-teacher", "--data", spec, *args, "--out", str(out), check=False)


@pytest.mark.parametrize("workers", ["0", "2"])
def test_an_outage_during_extract_is_no_skip_and_a_rerun_completes(server, tmp_path, workers):
    """Every image read fails (resets): the run fails in one line, no shard of those images is
    committed and nothing is recorded as skipped; the rerun with the server healthy reads them all."""
    weights = make_tiny_teacher_weights(tmp_path / "t.safetensors", img_size=32)
    spec = f"wds:{server.url}/shard-{{000..001}}.tar"
    out = tmp_path / "store"
    server.add("reset", match="shard-001", times=None, ranged=True)
    failed = _extract(spec, out, weights, "--workers", workers)
    text = failed.stdout + failed.stderr
    assert failed.returncode == 2 and "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "after 4 attempts" in errors[0], text
    assert "skipped" not in text
    assert not (out / "cospress" / "manifest").exists()
    commits = list((out / "cospress" / "commits").glob("shard-*")) if (out / "cospress").exists() else []
    assert len(commits) <= 1  # shard 0 (the first tar's 3 images) may be done; shard 1 never
    server.clear()
    again = _extract(spec, out, weights, "--workers", workers)
    assert again.returncode == 0, again.stdout + again.stderr
    reader = StoreReader(out)
    assert reader.num_rows == 6 and reader.manifest["skipped"] == [] and reader.valid().all()


def test_a_rerun_extracts_again_shards_skipped_for_a_read_failure(tmp_path, caplog):
    """A store of an older cospress records an outage as skipped images: the same command again
    extracts those shards anew (and keeps the shards whose skips were bad images)."""
    from cospress.store.records import detect, read_record, write_record

    images = make_image_folder(tmp_path / "img", classes=2, per_class=4)
    (images / "class_0" / "broken.png").write_bytes(b"not a png")
    weights = make_tiny_teacher_weights(tmp_path / "t.safetensors", img_size=32)
    store = extract_tiny_store(images, weights, tmp_path / "store")
    paths = detect(store)
    first = StoreReader(store)
    bad_image_shard = first.keys().index("class_0/broken.png") // first.shard_size
    io_shard = 1 if bad_image_shard != 1 else 0
    commit = read_record(store, paths.commit(io_shard))
    key = commit and first.keys()[first.shard_size * io_shard]
    commit["skipped"] = [{"key": key, "reason": "unreadable: Cannot connect to host 127.0.0.1:9 ssl:default"}]
    write_record(store, paths.commit(io_shard), commit, paths)
    before = {s: (store / paths.commit(s)).stat().st_mtime_ns for s in range(first.num_shards)}
    with caplog.at_level("WARNING"):
        extract_tiny_store(images, weights, store)
    assert "skipped for a read failure" in caplog.text
    after = {s: (store / paths.commit(s)).stat().st_mtime_ns for s in range(first.num_shards)}
    assert read_record(store, paths.commit(io_shard))["skipped"] == [] and after[io_shard] != before[io_shard]
    assert after[bad_image_shard] == before[bad_image_shard]  # a bad image stays skipped
    r = StoreReader(store)
    assert [s["key"] for s in r.manifest["skipped"]] == ["class_0/broken.png"]
    assert r.verify() == []


def test_store_reads_over_s3_through_a_faulty_proxy(tmp_path, monkeypatch):
    """The moto S3 server behind the fault-injecting proxy: each kind of fault is survived (botocore,
    s3fs and cospress retry), an outage ends in one line within a bounded time."""
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    import logging

    from cospress.store.publish import publish_store

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    moto = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    nowhere = str(tmp_path / "none")
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": nowhere, "AWS_SHARED_CREDENTIALS_FILE": nowhere,
    }  # fmt: skip
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    proxy = FaultServer(upstream=f"http://{host}:{port}")
    try:
        import s3fs

        with contextlib.suppress(FileExistsError):  # moto's buckets live as long as the process
            s3fs.S3FileSystem(skip_instance_cache=True).mkdir("faults")
        images = make_image_folder(tmp_path / "img", classes=2, per_class=4)
        weights = make_tiny_teacher_weights(tmp_path / "t.safetensors", img_size=32)
        store = extract_tiny_store(images, weights, tmp_path / "store")
        publish_store(store, "s3://faults/x")
        want = StoreReader(store).read_rows(np.arange(8))
        opts = {"endpoint_url": proxy.url, "skip_instance_cache": True}
        places = ("/manifest/", "/cls/c/1/", "/tokens/c/", "/views/c/", "/keys/c/")
        for fault, where in zip(FAULTS, places, strict=True):
            proxy.add(fault, match=where)
        got = StoreReader("s3://faults/x", storage_options=opts).read_rows(np.arange(8))
        assert proxy.pending() == 0
        for name in ("cls", "views", "tokens", "labels", "valid"):
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
        assert got["keys"] == want["keys"]
        proxy.add("500", match="/views/", times=None)
        t0 = time.perf_counter()
        opts["config_kwargs"] = {"retries": {"max_attempts": 1}}
        with pytest.raises(NetworkError, match=r"views/.* \(after 4 attempts\)") as err:
            StoreReader("s3://faults/x", storage_options=opts).read_rows([1])
        assert "\n" not in str(err.value) and time.perf_counter() - t0 < 30
    finally:
        proxy.close()
        moto.stop()
