"""`cospress publish` as a transaction (#24 items 1, 2, 10; #26): local checksums first, nothing
outside a store replaced, no link followed, no manifest left after a failure, nothing re-downloaded
to hash it, and a resumed publish that skips what is there."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import logging  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[test]')")

from cospress.errors import StoreError  # noqa: E402
from cospress.store import StoreReader  # noqa: E402
from cospress.store import manifest as mf  # noqa: E402
from cospress.store.publish import KILL_AFTER_ENV, publish_store  # noqa: E402
from cospress.store.records import NEW  # noqa: E402
from tests import test_s3_store  # noqa: E402
from tests.helpers import error_line, run_cli  # noqa: E402
from tests.test_sharing import make_store  # noqa: E402

s3 = test_s3_store.s3  # the moto S3 server fixture (module scope), shared with test_s3_store


@pytest.fixture
def store(tmp_path) -> Path:
    """A complete store (11 rows, shards of 4) written with the real StoreWriter, in ``stores/a``."""
    make_store(tmp_path / "stores" / "a", "teamA", 11, 4, seed=1)
    return tmp_path / "stores" / "a"


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


class _Requests(logging.Handler):
    """The requests the moto server logs (werkzeug, INFO): ``(method, path)``."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        m = re.search(r'"(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP', record.getMessage())
        if m:
            self.lines.append((m.group(1), m.group(2)))

    def object_gets(self, prefix: str) -> list[str]:
        """GETs of objects under ``/prefix`` (listings are ``GET /bucket?list-type=2...``)."""
        return [p for m, p in self.lines if m == "GET" and p.startswith(f"/{prefix}/")]


@contextmanager
def _requests():
    log = logging.getLogger("werkzeug")
    handler, level = _Requests(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def test_overwrite_replaces_only_a_store_never_a_parent_or_other_files(store, tmp_path):
    """#24 item 1: `publish stores/a stores --overwrite` deleted the store and all of stores/."""
    stores = store.parent
    (stores / "notes.txt").write_text("keep me")
    make_store(stores / "b", "teamB", 7, 3, seed=2)
    before = _files(stores)
    line = error_line(run_cli("publish", str(store), str(stores), "--overwrite", check=False))
    assert "a folder above the store" in line, line
    line = error_line(run_cli("publish", str(store), str(store / "cls"), "--overwrite", check=False))
    assert "inside the store" in line, line
    other = tmp_path / "other"  # a folder of files that are no store
    other.mkdir()
    (other / "data.bin").write_bytes(b"\1" * 100)
    line = error_line(run_cli("publish", str(store), str(other), "--overwrite", check=False))
    assert "holds files but not a store" in line and "--overwrite replaces only" in line, line
    assert _files(stores) == before and (other / "data.bin").read_bytes() == b"\1" * 100
    # an empty folder, then another store (with --overwrite) are what publish replaces
    run_cli("publish", str(stores / "b"), str(tmp_path / "dest"), "--no-progress")
    line = error_line(run_cli("publish", str(store), str(tmp_path / "dest"), check=False))
    assert "holds another store" in line
    run_cli("publish", str(store), str(tmp_path / "dest"), "--overwrite", "--no-progress")
    assert StoreReader(tmp_path / "dest").num_rows == 11 and StoreReader(tmp_path / "dest").verify() == []


def test_local_checksums_are_checked_before_anything_is_sent(s3, store):
    """#24 item 2: a store that does not match its manifest was uploaded, manifest included."""
    shard = store / "cls" / "c" / "1" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    shard.write_bytes(bytes(raw))
    url = "s3://bucket/pub/corrupt"
    line = error_line(run_cli("publish", str(store), url, check=False))
    assert "does not match its manifest" in line and "cls/c/1/0/0" in line and "nothing was sent" in line
    assert not s3.exists("bucket/pub/corrupt")
    with pytest.raises(StoreError, match="nothing is at"):
        StoreReader(url)


def test_a_failure_after_the_upload_leaves_no_manifest(s3, store):
    """#24 item 2: a publish whose check fails left the remote manifest, and readers read it."""
    url = "s3://bucket/pub/fails"
    publish_store(store, url)  # an earlier, complete copy with its manifest
    victim = store / "views" / "c" / "2" / "0" / "0"
    original = victim.read_bytes()
    sha = StoreReader(store).manifest["shards"][2]["sha256"]["views"]

    def change_a_file_mid_publish(done: int, total: int) -> None:
        if done == total // 2:  # every file hashed, none sent yet: the copy sent differs
            raw = bytearray(victim.read_bytes())
            raw[-1] ^= 0x01
            victim.write_bytes(bytes(raw))

    s3.rm_file("bucket/pub/fails/" + mf.shard_file_key("views", 2, 3))  # something to send again
    with pytest.raises(StoreError, match="does not match the local store after the upload"):
        publish_store(store, url, progress=change_a_file_mid_publish)
    assert not s3.exists(f"bucket/pub/fails/{NEW.manifest}")
    with pytest.raises(StoreError, match="has no manifest"):
        StoreReader(url, storage_options={"use_listings_cache": False})
    victim.write_bytes(original)  # fixed: the same command finishes it
    info = publish_store(store, url)
    assert info["sent"] == 2 and StoreReader(url).verify() == [] and len(sha) == 64


def test_symlinks_in_a_store_are_refused_never_uploaded(store, tmp_path):
    """#24 item 10: a link to /etc/hostname inside a store was uploaded as a file."""
    target = tmp_path / "secret.txt"
    target.write_text("host-secret-1234")
    for link, to in ((store / "cls" / "notes", target), (store / "linked", tmp_path)):
        link.symlink_to(to)
        proc = run_cli("publish", str(store), str(tmp_path / "dest"), check=False)
        line = error_line(proc)
        assert "symbolic link" in line and link.name in line and "follows no links" in line, line
        assert not (tmp_path / "dest").exists()
        link.unlink()
    run_cli("publish", str(store), str(tmp_path / "dest"), "--no-progress")
    assert all("host-secret-1234" not in str(v) for v in _files(tmp_path / "dest").values())


def test_publish_never_downloads_to_hash_and_a_resume_skips_what_is_there(s3, store, monkeypatch):
    """#26: publish re-downloaded every file to hash it, and again on a resumed publish."""
    url, prefix = "s3://bucket/pub/resume", "bucket/pub/resume"
    size = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    monkeypatch.setenv(KILL_AFTER_ENV, "6")
    with _requests() as req:
        assert run_cli("publish", str(store), url, check=False).returncode == -9  # killed after 6 files
    assert len(s3.find(prefix)) == 6 and not s3.exists(f"{prefix}/{NEW.manifest}")
    monkeypatch.delenv(KILL_AFTER_ENV)
    with _requests() as req:
        info = publish_store(store, url)
    assert info["already_there"] == 6 and info["sent"] == info["files"] - 6
    gets = req.object_gets(prefix)
    assert gets == [f"/{prefix}/{NEW.identity}"], gets  # only the identity (to know the store there)
    assert info["bytes_read"] < 0.01 * size * 10, (info["bytes_read"], size)
    with _requests() as req:
        again = publish_store(store, url)  # complete: nothing sent, nothing but the identity read
    assert again["sent"] == 0 and req.object_gets(prefix) == [f"/{prefix}/{NEW.identity}"]
    # a remote file changed behind our back (same size) is found by its ETag and sent again
    key = f"{prefix}/{mf.shard_file_key('cls', 1, 3)}"
    raw = bytearray(s3.cat_file(key))
    raw[len(raw) // 3] ^= 0x04
    s3.pipe_file(key, bytes(raw))
    info = publish_store(store, url)
    assert info["sent"] == 2 and StoreReader(url).verify() == []  # the shard file, then the manifest


def test_without_etags_ranges_are_compared_and_a_local_folder_is_hashed(store, tmp_path):
    """A backend without MD5 ETags (fsspec's memory filesystem): size + three small ranges."""
    url = "memory://pub/store"
    info = publish_store(store, url)
    assert info["sent"] == info["files"] and StoreReader(url).verify() == []
    import fsspec

    fs = fsspec.filesystem("memory")
    key = f"/pub/store/{mf.shard_file_key('cls', 0, 3)}"
    raw = bytearray(fs.cat_file(key))
    raw[len(raw) // 2] ^= 0x04  # in the middle range
    fs.pipe_file(key, bytes(raw))
    info = publish_store(store, url)
    assert info["sent"] == 2 and 0 < info["bytes_read"] <= info["files"] * 3 * 4096 + 10_000
    dest = tmp_path / "dest"
    publish_store(store, dest)
    shard = dest / mf.shard_file_key("views", 1, 3)
    raw = bytearray(shard.read_bytes())
    raw[1] ^= 0x04
    shard.write_bytes(bytes(raw))
    assert publish_store(store, dest)["sent"] == 2 and StoreReader(dest).verify() == []
    shutil.rmtree(dest)
