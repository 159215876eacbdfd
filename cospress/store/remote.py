"""Reading a store over a network: byte-range support of a server and a local file cache."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import fsspec
import zarr
from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype

from cospress.errors import StoreError
from cospress.netio import retry
from cospress.utils import redact_url


def is_local(url: str) -> bool:
    return "://" not in url


def check_range_support(fs: fsspec.AbstractFileSystem, path: str, display: str | None = None) -> None:
    """Raise StoreError when the server of ``path`` ignores byte ranges (returns the whole file).

    Sharded arrays are read by byte range; a server that answers a ranged GET with the full body
    (200 instead of 206) would make every row read fetch a whole shard, or misread it.
    """
    where = display or redact_url(path)
    try:
        data = retry(lambda: fs.cat_file(path, start=1, end=3), where)
    except FileNotFoundError:
        raise StoreError(
            f"{where} is missing; the store is incomplete or corrupted: re-upload or re-extract it"
        ) from None
    if len(data) != 2:
        raise StoreError(
            f"the server of {where} does not support byte ranges (asked for 2 bytes, got {len(data)}): "
            "serve the store with a server that honours Range requests (nginx, S3, GCS) or copy it locally"
        )


class FileCacheStore(zarr.storage.WrapperStore):
    """Read-through cache of a remote store's files under ``cache_dir``.

    A file the manifest hashes (every shard file; from schema 1.3 every metadata file) is fetched
    whole, streamed to a temporary file and checked against the manifest's sha256 before it is moved
    into place; a cached file is checked again the first time each process uses it, so a corrupt or
    stale copy is fetched again, never used. A lock file per file makes the fetch happen once however
    many threads and processes miss it at once (the others wait, then use the verified copy). Files
    the manifest does not hash are read from the remote store, uncached.
    """

    def __init__(self, store: zarr.abc.store.Store, cache_dir: str, fs: Any, root: str, manifest: dict,
                 where: str) -> None:  # fmt: skip
        super().__init__(store)
        self._args = (cache_dir, fs, root, manifest, where)
        tag = hashlib.sha256(f"{root}\n{manifest.get('created')}".encode()).hexdigest()[:16]
        self._dir = Path(cache_dir) / tag
        self._fs, self._root, self._where = fs, root, where
        self._hashes = dict(manifest.get("metadata_sha256") or {})
        for entry in manifest["shards"]:
            for name, sha in entry["sha256"].items():
                ndim = len(manifest["shapes"][name])  # the shard file's key (`manifest.shard_file_key`)
                self._hashes["/".join([name, "c", str(entry["shard"])] + ["0"] * (ndim - 1))] = sha
        self._local = zarr.storage.LocalStore(str(self._dir), read_only=True)

    def _with_store(self, store: zarr.abc.store.Store) -> FileCacheStore:
        return type(self)(store, *self._args)

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        sha = self._hashes.get(key)
        if sha is None:
            return await self._store.get(key, prototype, byte_range)
        remote, where = f"{self._root}/{key}", f"{self._where}: {key}"
        if not await asyncio.to_thread(fetch_verified, self._fs, remote, self._dir, key, sha, where):
            return None
        return await self._local.get(key, prototype, byte_range)

    async def get_partial_values(self, prototype: BufferPrototype, key_ranges: Any) -> list[Buffer | None]:
        return [await self.get(key, prototype, rng) for key, rng in key_ranges]


_VERIFIED: set[str] = set()  # cached files this process has checked
_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_LOCK = threading.Lock()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def fetch_verified(fs: Any, remote: str, cache_root: Path, key: str, sha: str, where: str) -> bool:
    """Make ``cache_root/key`` a verified copy of ``remote`` (sha256 ``sha``; ``where`` names it):
    False when the remote file is missing; StoreError when the fetched bytes do not match."""
    local = cache_root / key
    name = str(local)
    if name in _VERIFIED and local.is_file():
        return True
    with _LOCKS_LOCK:
        lock = _LOCKS.setdefault(name, threading.Lock())
    local.parent.mkdir(parents=True, exist_ok=True)
    lock_path = Path(f"{cache_root}.locks") / hashlib.sha256(name.encode()).hexdigest()[:32]
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock, open(lock_path, "a") as lf:
        fcntl.flock(lf, fcntl.LOCK_EX)  # one fetch across processes; released when the file closes
        if name in _VERIFIED and local.is_file():
            return True
        if local.is_file() and _sha256_file(local) == sha:
            _VERIFIED.add(name)
            return True
        tmp = local.with_name(f".{local.name}.{os.getpid()}.part")
        try:
            retry(lambda: fs.get_file(remote, str(tmp)), where)  # streamed to disk, never held in memory
        except FileNotFoundError:
            tmp.unlink(missing_ok=True)
            return False
        got = _sha256_file(tmp)
        if got != sha:
            tmp.unlink(missing_ok=True)
            raise StoreError(
                f"{where} as fetched has sha256 {got[:12]}..., not the manifest's {sha[:12]}...: the remote "
                "copy is corrupted or was changed; run `cospress verify` on the store and re-upload it"
            )
        os.replace(tmp, local)
        _VERIFIED.add(name)
        return True
