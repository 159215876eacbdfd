"""Publish a finished local store to any fsspec URL (s3://, gs://, a folder a web server serves, ...)
as a transaction: a reader of the destination sees the old complete store, no store, or the new
complete store; never a half-published or mismatched one.

1. The local store is checked first: no symbolic link or special file in it, and every file the
   manifest lists has the manifest's sha256 (nothing is sent from a store that does not match).
2. The destination must be empty, an earlier version of this store, or (with ``overwrite``) another
   store; never the store itself, a folder above or inside it, or a folder of other files.
3. A manifest already at the destination is deleted before the first upload; then the identity,
   the data files, the records (commits, config) and, once every uploaded object is checked, the
   manifest strictly last. On any failure the destination's manifest is removed.
4. Nothing is downloaded to hash it: a remote object is checked by its size and its ETag (the MD5
   of a single-part upload, computed locally beside the sha256) where the backend offers one, else
   by its size and three 4 KiB ranges; a local destination is hashed (a local read). A file already
   there and checked is not sent again, so rerunning an interrupted publish finishes it.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from cospress.errors import CospressError, StoreError
from cospress.store import manifest as mf
from cospress.store import records
from cospress.store.local_files import LocalFile, local_files
from cospress.store.reader import StoreReader
from cospress.store.records import LEGACY, NEW, detect
from cospress.store.remote import is_local
from cospress.utils import atomic_write, redact_text, redact_url, sha256_file

# Test hook: SIGKILL this process before upload number N+1 (N files sent), as a crash would.
KILL_AFTER_ENV = "COSPRESS_TEST_PUBLISH_KILL_AFTER"
# fsspec protocols of object stores: no folders to create (and makedirs would create a bucket).
_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"}
# What may differ between the identity at the destination and ours while it is still the same store
# (a later version of it, grown by `extract-teacher --append`).
_GROWS = ("num_rows", "shapes", "source", "class_names")
_SAMPLE = 4096  # bytes of each of the three ranges read back where the backend gives no MD5 ETag
_MD5_ETAG = re.compile(r'^"?([0-9a-f]{32})"?$')


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
    """The folder at ``url``: its listing (sizes, ETags), the checks of its objects, uploads, deletes."""

    def __init__(self, url: str, storage_options: dict):
        self.display = redact_url(url)
        self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self.root = root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.object_store = bool(_OBJECT_STORES.intersection(protocols))
        self.bytes_read = 0  # object bytes read back from the destination (ranges, records)
        self.manifest_unsure = False  # True while a failure must remove the destination's manifest
        self.infos: dict[str, dict] = {}
        self.refresh()

    def refresh(self) -> None:
        """List the destination again (one listing; no object is read)."""
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError as e:  # s3fs / gcsfs: the bucket does not exist
            raise StoreError(
                f"cannot publish to {self.display}: {redact_text(str(e))}; create the bucket first"
            ) from None
        self.infos = {name[len(self.root) + 1 :]: info for name, info in found.items()}

    def path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def is_store(self) -> bool:
        return any(p.identity in self.infos or p.manifest in self.infos for p in (NEW, LEGACY))

    def holds(self, f: LocalFile, src: Path) -> bool:
        """The file is there and checked: its size, then its MD5 ETag, else (a local folder) its
        sha256, else three small ranges compared with the local file."""
        info = self.infos.get(f.key)
        if info is None or int(info.get("size") or 0) != f.size:
            return False
        if self.local:
            return sha256_file(self.path(f.key)) == f.sha256
        etag = _MD5_ETAG.match(str(info.get("ETag") or info.get("etag") or "").lower())
        if etag is not None and f.md5 is not None:
            return etag.group(1) == f.md5
        return self._ranges_match(f, src)

    def _ranges_match(self, f: LocalFile, src: Path) -> bool:
        with open(src, "rb") as local:
            for start in sorted({0, max(0, f.size // 2 - _SAMPLE // 2), max(0, f.size - _SAMPLE)}):
                end = min(f.size, start + _SAMPLE)
                local.seek(start)
                remote = self.fs.cat_file(self.path(f.key), start=start, end=end)
                self.bytes_read += len(remote)
                if remote != local.read(end - start):
                    return False
        return True

    def identity(self) -> dict | None:
        key = next((p.identity for p in (NEW, LEGACY) if p.identity in self.infos), None)
        if key is None:
            return None
        try:
            raw = self.fs.cat_file(self.path(key))
            self.bytes_read += len(raw)
            return records.loads(raw)
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
        if key in self.infos:
            self.fs.rm_file(self.path(key))
            del self.infos[key]

    def remove_manifests(self) -> None:
        """Delete any manifest there (both layouts), whether listed or not: readers then refuse it."""
        for paths in (NEW, LEGACY):
            try:
                self.fs.rm_file(self.path(paths.manifest))
            except FileNotFoundError:
                pass
            self.infos.pop(paths.manifest, None)

    def clear(self) -> None:
        """Delete another store (its manifest first)."""
        self.remove_manifests()
        if self.infos:
            self.fs.rm(self.root, recursive=True)
            self.infos = {}


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
    """Upload the finished local ``store`` to ``url`` as a transaction (see the module docstring).

    Refuses a store without manifest or not matching it, a destination that is the store, a folder
    above or inside it, or a folder of files that are not a store, and a destination holding another
    store unless ``overwrite`` (which deletes that store first). ``progress(done, total)`` counts
    files hashed, then files checked or sent. Returns {url, files, sent, already_there, bytes_sent,
    bytes_read, shards_verified}: ``bytes_read`` are the bytes read back from the destination.
    """
    root, identity = _open_source(store)
    dest = None
    try:
        dest = _Destination(url, dict(storage_options or {}))
        return _publish(root, identity, dest, overwrite, progress)
    except BaseException as e:
        if dest is not None and dest.manifest_unsure:
            _undo(dest)
        if isinstance(e, CospressError) or not isinstance(e, Exception):
            raise
        # fsspec / botocore errors may quote URLs with credentials
        raise StoreError(
            f"cannot publish to {redact_url(url)}: {redact_text(f'{type(e).__name__}: {e}')}; "
            "check the URL, the bucket and the credentials"
        ) from None


def _undo(dest: _Destination) -> None:
    """After a failure: no manifest may stay at the destination (best effort; a reader refuses it)."""
    try:
        dest.remove_manifests()
    except Exception:  # the network may be what failed: the manifest was then never written either
        pass


def _check_place(dest: _Destination, root: Path) -> None:
    """Refuse a local destination that is the store, a folder above it, or a folder inside it."""
    if not dest.local:
        return
    where = Path(dest.root).resolve()
    if where == root:
        raise StoreError(f"{dest.display} is the store itself: publish to another folder or URL")
    if where in root.parents:
        raise StoreError(f"{dest.display} is a folder above the store {root}: publish to a folder of its own")
    if root in where.parents:
        raise StoreError(f"{dest.display} is inside the store {root}: publish to a folder outside it")


def _check_destination(dest: _Destination, identity: dict, overwrite: bool) -> None:
    """Refuse (or, with ``overwrite``, clear) a destination that holds something else than this store;
    ``overwrite`` replaces only a store, never a folder of other files."""
    if not dest.infos:
        return
    if not dest.is_store():
        raise StoreError(
            f"{dest.display} holds files but not a store: publish to an empty folder or URL "
            "(--overwrite replaces only a cospress store)"
        )
    remote = dest.identity()
    if remote is None:
        what = "a store manifest but no store identity"
    elif diff := _other_store(remote, identity):
        what = f"another store (it differs in {'; '.join(diff[:3])})"
    else:
        return
    if not overwrite:
        raise StoreError(
            f"{dest.display} holds {what}: pass --overwrite to replace it, or publish to another URL"
        )
    dest.clear()


def _send(dest: _Destination, root: Path, todo: list[LocalFile], report: Callable[[], None]) -> None:
    """Upload ``todo`` in order, then list the destination and check every object sent."""
    kill = _kill_hook()
    for sent, f in enumerate(todo):
        kill(sent)
        dest.put(root / f.key, f.key)
        report()
    dest.refresh()
    bad = [f.key for f in todo if not dest.holds(f, root / f.key)]
    if bad:
        raise StoreError(
            f"the copy at {dest.display} does not match the local store after the upload ({len(bad)} files, "
            f"first: {bad[0]}): readers refuse it (no manifest); publish again"
        )


def _publish(
    root: Path,
    identity: dict,
    dest: _Destination,
    overwrite: bool,
    progress: Callable[[int, int], None] | None,
) -> dict:
    report = progress or (lambda done, total: None)
    _check_place(dest, root)
    paths = detect(root)
    manifest = records.read_record(root, paths.manifest)
    files = local_files(root, manifest, paths, not dest.local, lambda i, n: report(i, 2 * n))
    _check_destination(dest, identity, overwrite)
    todo = [f for f in files if not dest.holds(f, root / f.key)]
    done = [len(files) * 2 - len(todo)]  # files hashed and files already there

    def step() -> None:
        done[0] += 1
        report(done[0], 2 * len(files))

    report(done[0], 2 * len(files))
    if todo:
        dest.manifest_unsure = True  # from here on, a failure removes the manifest
        dest.remove_manifests()  # before anything changes: readers see an incomplete store
        last = files[-1]  # the manifest: sent again after the others, strictly last
        todo = [f for f in todo if f.key != paths.manifest]
        _send(dest, root, todo, step)
        _send(dest, root, [last], step)
        todo.append(last)
        dest.manifest_unsure = False
    return {
        "url": dest.display,
        "files": len(files),
        "sent": len(todo),
        "already_there": len(files) - len(todo),
        "bytes_sent": sum(f.size for f in todo),
        "bytes_read": dest.bytes_read,
        "shards_verified": len(manifest["shards"]),
    }
