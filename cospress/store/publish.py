"""Publish a finished local store to any fsspec URL (s3://, gs://, a folder a web server serves, ...).

The order keeps readers safe: a manifest already at the destination is deleted first (readers then
refuse the store as incomplete), the identity file goes next, then every other file, and
``manifest.json`` strictly last; then the remote copy is verified (sha256 of every shard file).
Publishing is resumable: a file already there with the right size and sha256 is not sent again, so
rerunning an interrupted publish finishes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from cospress.errors import CospressError, StoreError
from cospress.store import manifest as mf
from cospress.store import records
from cospress.store.reader import StoreReader
from cospress.store.records import LEGACY, NEW, StorePaths, detect
from cospress.store.remote import is_local
from cospress.utils import atomic_write, redact_text, redact_url, sha256_file

# Test hook: SIGKILL this process before upload number N+1 (N files sent), as a crash would.
KILL_AFTER_ENV = "COSPRESS_TEST_PUBLISH_KILL_AFTER"
# fsspec protocols of object stores: no folders to create (and makedirs would create a bucket).
_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"}
# What may differ between the identity at the destination and ours while it is still the same store
# (a later version of it, grown by `extract-teacher --append`).
_GROWS = ("num_rows", "shapes", "source")


@dataclass(frozen=True)
class LocalFile:
    key: str  # path relative to the store root, "/"-separated
    size: int
    sha256: str


def _local_files(root: Path, manifest: dict, paths: StorePaths) -> list[LocalFile]:
    """Every file of the store but temp files; the sha256 of shard files (and, from schema 1.3, of
    metadata files) comes from the manifest, the others' is computed."""
    known = dict(manifest.get("metadata_sha256") or {})
    for entry in manifest["shards"]:
        for name, sha in entry["sha256"].items():
            known[mf.shard_file_key(name, entry["shard"], len(manifest["shapes"][name]))] = sha
    files = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            key = p.relative_to(root).as_posix()
            files.append(LocalFile(key, p.stat().st_size, known.get(key) or sha256_file(p)))
    first = {paths.identity: 0, paths.manifest: 2}  # identity first, manifest strictly last
    return sorted(files, key=lambda f: first.get(f.key, 1))


def _remote_sha256(fs: fsspec.AbstractFileSystem, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _grown_from(old: Any, new: Any) -> bool:
    """True when source ``new`` is ``old``, or ``old`` followed by appended parts."""
    if old == new or not isinstance(old, dict) or not isinstance(new, dict):
        return old == new
    old_parts = old.get("parts") or [old]
    return new.get("kind") == "append" and (new.get("parts") or [])[: len(old_parts)] == old_parts


def _other_store(remote: dict, local: dict) -> list[str]:
    """What makes the store at the destination another store than ours ([] when it is ours)."""
    a = {k: v for k, v in remote.items() if k not in _GROWS}
    b = {k: v for k, v in local.items() if k not in _GROWS}
    diff = mf.identity_diff(a, b)
    if not _grown_from(remote.get("source"), local.get("source")):
        diff += mf.identity_diff({"source": remote.get("source")}, {"source": local.get("source")})
    return diff


class _Destination:
    """The folder at ``url``: its file listing, and the uploads and deletes publish needs."""

    def __init__(self, url: str, storage_options: dict):
        self.display = redact_url(url)
        self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self.root = root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.object_store = bool(_OBJECT_STORES.intersection(protocols))
        try:
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError as e:  # s3fs / gcsfs: the bucket does not exist
            raise StoreError(
                f"cannot publish to {self.display}: {redact_text(str(e))}; create the bucket first"
            ) from None
        self.sizes = {name[len(self.root) + 1 :]: int(info["size"]) for name, info in found.items()}

    def path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def holds(self, f: LocalFile) -> bool:
        """The file is there with the right size and sha256 (read back to check)."""
        return self.sizes.get(f.key) == f.size and _remote_sha256(self.fs, self.path(f.key)) == f.sha256

    def identity(self) -> dict | None:
        key = next((p.identity for p in (NEW, LEGACY) if p.identity in self.sizes), None)
        if key is None:
            return None
        try:
            return records.loads(self.fs.cat_file(self.path(key)))
        except json.JSONDecodeError:
            return {"format": "not valid JSON"}

    def put(self, src: Path, key: str) -> None:
        """One file; a local destination gets it atomically (temp file, then rename)."""
        dst = self.path(key)
        if self.local:
            atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))
            return
        if not self.object_store:
            self.fs.makedirs(posixpath.dirname(dst), exist_ok=True)
        self.fs.put_file(str(src), dst)

    def remove(self, key: str) -> None:
        if key in self.sizes:
            self.fs.rm_file(self.path(key))
            del self.sizes[key]

    def clear(self) -> None:
        for paths in (NEW, LEGACY):
            self.remove(paths.manifest)  # first: readers then see an incomplete store
        if self.sizes:
            self.fs.rm(self.root, recursive=True)
            self.sizes = {}


def _kill_hook() -> Callable[[int], None]:
    limit = os.environ.get(KILL_AFTER_ENV)

    def check(sent: int) -> None:
        if limit is not None and sent >= int(limit):
            os.kill(os.getpid(), signal.SIGKILL)

    return check


def _open_source(store: str | os.PathLike) -> tuple[Path, dict]:
    """The root and the identity of a finished local store (StoreError when it is not one)."""
    if not is_local(str(store)):
        raise StoreError(f"publish copies a local store, not {redact_url(str(store))}: copy it locally first")
    root = Path(store).resolve()
    StoreReader(root)  # refuses an incomplete store (no manifest) or an unknown schema
    identity = records.read_record(root, detect(root).identity)
    return root, identity


def publish_store(
    store: str | os.PathLike,
    url: str,
    *,
    overwrite: bool = False,
    storage_options: dict | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Upload the finished local ``store`` to ``url``, manifest last, then verify the remote copy.

    Refuses a store without manifest, and a destination holding another store (another identity)
    or files that are not a store, unless ``overwrite`` (which deletes them first). ``progress(done,
    total)`` counts files (sent or already there), then verified shards. Returns {url, files, sent,
    already_there, bytes_sent, shards_verified}.
    """
    root, identity = _open_source(store)
    try:
        return _publish(root, identity, url, overwrite, dict(storage_options or {}), progress)
    except CospressError:
        raise
    except Exception as e:  # fsspec / botocore errors may quote URLs with credentials
        raise StoreError(
            f"cannot publish to {redact_url(url)}: {redact_text(f'{type(e).__name__}: {e}')}; "
            "check the URL, the bucket and the credentials"
        ) from None


def _check_destination(dest: _Destination, identity: dict, overwrite: bool) -> None:
    """Refuse (or, with ``overwrite``, clear) a destination that holds something else than this store."""
    remote = dest.identity()
    if remote is None and not dest.sizes:
        return
    if remote is None:
        what = "files but no store identity (not a store)"
    elif diff := _other_store(remote, identity):
        what = f"another store (it differs in {'; '.join(diff[:3])})"
    else:
        return
    if not overwrite:
        raise StoreError(
            f"{dest.display} holds {what}: pass --overwrite to replace it, or publish to another URL"
        )
    dest.clear()


def _publish(
    root: Path,
    identity: dict,
    url: str,
    overwrite: bool,
    storage_options: dict,
    progress: Callable[[int, int], None] | None,
) -> dict:
    report = progress or (lambda done, total: None)
    dest = _Destination(url, storage_options)
    if dest.local and Path(dest.root).resolve() == root:
        raise StoreError(f"{dest.display} is the store itself: publish to another folder or URL")
    _check_destination(dest, identity, overwrite)
    paths = detect(root)
    manifest = records.read_record(root, paths.manifest)
    files = _local_files(root, manifest, paths)
    total = len(files) + len(manifest["shards"])
    kill = _kill_hook()
    todo, held = [], 0
    for f in files:
        if dest.holds(f):
            held += 1
            report(held, total)
        else:
            todo.append(f)
    if todo:
        dest.remove(paths.manifest)  # before anything changes: readers see an incomplete store
        if not any(f.key == paths.manifest for f in todo):
            todo.append(files[-1])  # the manifest was deleted: it goes back, last
            held -= 1
    for sent, f in enumerate(todo):
        kill(sent)
        dest.put(root / f.key, f.key)
        report(held + sent + 1, total)
    dest.fs.invalidate_cache()
    reader = StoreReader(url, storage_options=storage_options)
    bad = reader.verify(progress=lambda i, n: report(len(files) + i, total))
    if bad:
        b = bad[0]
        first = f"shard {b['shard']} array {b['array']}" if b.get("shard") is not None else b.get("file")
        raise StoreError(
            f"the copy at {dest.display} does not match its manifest ({len(bad)} files, first: {first}): "
            "run `cospress verify` on the local store, then publish again"
        )
    return {
        "url": dest.display,
        "files": len(files),
        "sent": len(todo),
        "already_there": held,
        "bytes_sent": sum(f.size for f in todo),
        "shards_verified": reader.num_shards,
    }
