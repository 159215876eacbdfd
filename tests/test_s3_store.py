"""Stores in an S3 bucket of a real S3-compatible server (moto) on 127.0.0.1: `cospress publish`, then
every reading command from s3://; interrupted publishes, readers during a publish, credential errors."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

moto_server = pytest.importorskip(
    "moto.server", reason="moto[server] is not installed (pip install -e '.[test]' installs it)"
)
s3fs = pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e '.[test]' installs it)")

from cospress.errors import StoreError  # noqa: E402
from cospress.store import StoreReader  # noqa: E402
from cospress.store.publish import KILL_AFTER_ENV, publish_store  # noqa: E402
from cospress.store.records import NEW  # noqa: E402
from tests import helpers  # noqa: E402
from tests.helpers import error_line, run_cli  # noqa: E402

URL = "s3://bucket/stores/x"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 (stopped after the module) with the bucket "bucket"; the AWS_*
    variables (inherited by CLI subprocesses) point at it. Yields an s3fs filesystem on it."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    nowhere = str(tmp_path_factory.mktemp("aws") / "none")
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "cospress-test",
        "AWS_SECRET_ACCESS_KEY": "cospress-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": nowhere,
        "AWS_SHARED_CREDENTIALS_FILE": nowhere,
    }
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
                mp.delenv(k, raising=False)
            s3fs.S3FileSystem.clear_instance_cache()  # instances of another module's server (another port)
            fs = s3fs.S3FileSystem(skip_instance_cache=True)
            # one moto backend per process: another module's server may have made the bucket
            fs.makedirs("bucket", exist_ok=True)
            yield fs
    finally:
        server.stop()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return helpers.make_image_folder(tmp_path_factory.mktemp("img"), classes=2, per_class=8, seed=3)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return helpers.make_tiny_teacher_weights(tmp_path_factory.mktemp("w") / "t.safetensors", img_size=32)


@pytest.fixture(scope="module")
def store(tmp_path_factory, images, weights) -> Path:
    return helpers.extract_tiny_store(images, weights, tmp_path_factory.mktemp("local") / "store")


@pytest.fixture(scope="module")
def published(s3, store) -> str:
    """The store published with the CLI to s3://bucket/stores/x."""
    proc = run_cli("publish", str(store), URL, "--no-progress")
    assert "every checksum matches" in proc.stdout, proc.stdout
    return URL


def _knn_top1(bank_store: str, weights: Path, images: Path, out: Path) -> dict:
    from cospress.evaluate import EvalConfig, run_knn_eval

    cfg = EvalConfig(
        model=f"teacher:test_vit@32={weights}", bank_store=bank_store, test=f"folder:{images}", k=[3],
        robustness=False, attack=False, workers=0, cache_dir="none", out=str(out),
    )  # fmt: skip
    return run_knn_eval(cfg)


def test_publish_then_every_reading_command_reads_s3(published, store, images, weights, tmp_path):
    summary = json.loads(run_cli("inspect", published, "--json").stdout)
    assert summary["url"] == URL and summary["shards"] == 4 and summary["counts"]["rows"] == 16
    proc = run_cli("verify", published, "--cache-dir", str(tmp_path / "vcache"))
    assert "every shard checksum matches" in " ".join(proc.stderr.split())
    local, remote = StoreReader(store), StoreReader(published, cache_dir=str(tmp_path / "cache"))
    rows = np.random.default_rng(0).permutation(local.num_rows)
    assert remote.manifest == local.manifest and remote.keys() == local.keys()
    np.testing.assert_array_equal(remote.read_rows(rows)["tokens"], local.read_rows(rows)["tokens"])
    assert any((tmp_path / "cache").rglob("tokens/c/*/0/0/0"))  # the cache holds whole shard files
    a = helpers.distill_train_losses(str(store), tmp_path / "local", images, None)
    b = helpers.distill_train_losses(published, tmp_path / "s3", images, str(tmp_path / "dcache"))
    assert any((tmp_path / "dcache").rglob("cls/c/*/0/0"))  # the targets came from S3, via the cache
    helpers.assert_same_losses(a, b)
    knn_local = _knn_top1(str(store), weights, images, tmp_path / "knn-local")
    knn_s3 = _knn_top1(published, weights, images, tmp_path / "knn-s3")
    assert knn_s3["data"]["train"]["store"] == published and knn_s3["counts"]["bank"] == 16
    assert knn_s3["top1"] == knn_local["top1"]


def test_publish_refuses_an_incomplete_store_and_another_store(s3, store, images, weights, tmp_path):
    partial = Path(shutil.copytree(store, tmp_path / "partial"))
    (partial / NEW.manifest).unlink()
    assert "has no manifest" in error_line(run_cli("publish", str(partial), URL + "-p", check=False))
    other = helpers.extract_tiny_store(images, weights, tmp_path / "other", seed=1)  # another store
    url = "s3://bucket/stores/y"
    publish_store(store, url)
    line = error_line(run_cli("publish", str(other), url, check=False))
    assert "holds another store" in line and "seed" in line and "--overwrite" in line
    info = publish_store(other, url, overwrite=True)
    assert info["sent"] == info["files"] and StoreReader(url).manifest["seed"] == 1
    assert publish_store(store, tmp_path / "folder")["sent"] > 0  # a local folder (one a web server serves)
    assert StoreReader(tmp_path / "folder").verify() == []
    with pytest.raises(StoreError, match="is the store itself"):
        publish_store(store, store)
    s3.pipe_file("bucket/stores/junk/notes.txt", b"not a store")
    with pytest.raises(StoreError, match="not a store"):
        publish_store(store, "s3://bucket/stores/junk")


def test_a_killed_publish_is_refused_by_readers_and_a_rerun_finishes_it(s3, store, monkeypatch):
    url, root = "s3://bucket/stores/killed", "bucket/stores/killed"
    monkeypatch.setenv(KILL_AFTER_ENV, "5")
    assert run_cli("publish", str(store), url, check=False).returncode == -9  # SIGKILL after 5 files
    there = [p.removeprefix(root + "/") for p in s3.find(root)]
    assert len(there) == 5 and NEW.identity in there and NEW.manifest not in there
    assert "has no manifest" in error_line(run_cli("inspect", url, check=False))
    monkeypatch.delenv(KILL_AFTER_ENV)
    info = publish_store(store, url)
    assert info["already_there"] == 5 and info["sent"] == info["files"] - 5
    # a republish over an old manifest deletes it first: a shard that changed (same size) is sent
    # again, and a publish killed before its first upload leaves a store readers refuse
    shard = f"{root}/tokens/c/2/0/0/0"
    raw = bytearray(s3.cat_file(shard))
    raw[len(raw) // 3] ^= 0x04
    s3.pipe_file(shard, bytes(raw))
    monkeypatch.setenv(KILL_AFTER_ENV, "0")
    assert run_cli("publish", str(store), url, check=False).returncode == -9
    assert "has no manifest" in error_line(run_cli("verify", url, check=False))
    monkeypatch.delenv(KILL_AFTER_ENV)
    info = publish_store(store, url)
    assert info["sent"] == 2 and info["already_there"] == info["files"] - 2  # the shard, the manifest
    assert "every shard checksum matches" in " ".join(run_cli("verify", url).stderr.split())


def test_a_reader_during_a_publish_never_sees_a_partial_store(s3, store, images, weights, tmp_path):
    url = "s3://bucket/stores/live"
    seen: list[int] = []  # rows of the complete store a reader saw after each step, 0: refused
    verified: set[str] = set()

    def reader_looks(done: int, total: int) -> None:
        try:  # a reader of its own, without listings cache: it sees what the server holds
            reader = StoreReader(url, storage_options={"use_listings_cache": False})
        except StoreError as e:
            assert "has no manifest" in str(e) or "nothing is at" in str(e)  # nothing sent yet
            seen.append(0)
            return
        if reader.manifest["created"] + str(reader.num_rows) not in verified:  # each version, when first seen
            assert reader.verify() == [], "a complete-looking store with missing or partial files"
            verified.add(reader.manifest["created"] + str(reader.num_rows))
        seen.append(reader.num_rows)

    publish_store(store, url, progress=reader_looks)
    first = len(seen)
    assert seen[:3] == [0, 0, 0] and seen[-1] == 16 and seen == sorted(seen)
    # a later version of the store (grown by --append) over the published one
    grown = Path(shutil.copytree(store, tmp_path / "grown"))
    more = helpers.make_image_folder(tmp_path / "more", classes=2, per_class=10, seed=3)
    helpers.extract_tiny_store(more, weights, grown, append=True)
    info = publish_store(grown, url, progress=reader_looks)
    after, rows = seen[first:], StoreReader(grown).num_rows
    cut = after.index(0)  # the old manifest is deleted before the first upload
    assert info["already_there"] > 0 and rows > 16 and set(after[:cut]) == {16}
    assert set(after[cut:]) == {0, rows} and after[cut:] == sorted(after[cut:])


def test_wrong_credentials_and_a_missing_bucket_are_one_line_errors(published, store, monkeypatch):
    line = error_line(run_cli("publish", str(store), "s3://no-such-bucket/x", check=False))
    assert "bucket does not exist" in line and "create the bucket" in line
    with pytest.raises(StoreError, match="nothing is at s3://no-such-bucket/x: check the path or URL"):
        StoreReader("s3://no-such-bucket/x")
    from moto import settings

    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # the server checks keys now
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wr0ng-s3cr3t-k3y")
    for args in (["inspect", published], ["publish", str(store), published]):
        proc = run_cli(*args, check=False)
        line = error_line(proc)
        assert URL in line and "wr0ng-s3cr3t-k3y" not in proc.stdout + proc.stderr, line
