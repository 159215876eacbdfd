"""Where a store is written: a local folder or any fsspec URL (``s3://bucket/store``), one writer
with two destinations.

Keys are "/"-separated paths relative to the store's root. A local write goes through a temp file
named after its target and an ``os.replace`` (`shardio.write_shard_file`); an object store's PUT of
a whole object is atomic by itself, so a shard file, a commit record or the manifest is either there
whole or not at all, and nothing is staged locally.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import zarr

from cospress.store import records
from cospress.store.records import NEW, StorePaths, detect, encode, loads
from cospress.store.shardio import write_shard_file
from cospress.utils import redact_url

_GROUP = {"zarr_format": 3, "node_type": "group"}


def is_url(out: str | Path) -> bool:
    """Whether ``out`` names an fsspec URL (``s3://...``) rather than a local folder."""
    s = str(out)
    return "://" in s and not s.startswith("file://")


class Dest:
    """The root of a store being written, local or remote."""

    def __init__(self, root: str | Path) -> None:
        s = str(root)
        self.local = not is_url(s)
        if self.local:
            self.path = Path(s[len("file://") :] if s.startswith("file://") else s)
            self.url = str(self.path)
        else:
            import fsspec

            self.url = s.rstrip("/")
            # no listing cache: other ranks (and zarr's own filesystem object) write beside this one
            self.fs, self.base = fsspec.core.url_to_fs(self.url, use_listings_cache=False)
            self.base = self.base.rstrip("/")
            self.path = None

    def __str__(self) -> str:
        return redact_url(self.url)

    def _full(self, key: str) -> str:
        return f"{self.base}/{key}" if key else self.base

    def paths(self) -> StorePaths:
        """Where the records are: a local store's own layout; a remote store is written in 2.0's."""
        return detect(self.path) if self.local else NEW

    def exists(self, key: str) -> bool:
        return (self.path / key).is_file() if self.local else self.fs.exists(self._full(key))

    def read_bytes(self, key: str) -> bytes:
        """The object's bytes (FileNotFoundError when it is absent)."""
        return (self.path / key).read_bytes() if self.local else self.fs.cat_file(self._full(key))

    def write_bytes(self, key: str, data: bytes | Iterable[bytes]) -> str:
        """Write an object whole (bytes, or its parts in order); returns its sha256. Locally each part is
        hashed and written as it comes (`shardio.write_shard_file`); an object store gets one PUT."""
        if self.local:
            return write_shard_file(self.path / key, data)
        data = data if isinstance(data, (bytes, bytearray, memoryview)) else b"".join(data)
        self.fs.pipe_file(self._full(key), data)
        return hashlib.sha256(data).hexdigest()

    def remove(self, key: str) -> None:
        if self.local:
            (self.path / key).unlink(missing_ok=True)
            return
        try:
            self.fs.rm_file(self._full(key))
        except FileNotFoundError:
            pass

    def names(self, prefix: str) -> list[str]:
        """The names one level below ``prefix`` (files and folders; [] when there is none)."""
        if self.local:
            d = self.path / prefix
            return [e.name for e in d.iterdir()] if d.is_dir() else []
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._full(prefix), detail=False)]
        except FileNotFoundError:
            return []

    def existing(self, keys: list[str]) -> set[str]:
        """Which of ``keys`` exist: a check per key locally, one listing of the store remotely."""
        if self.local:
            return {k for k in keys if (self.path / k).is_file()}
        try:
            found = {p[len(self.base) + 1 :] for p in self.fs.find(self.base)}
        except FileNotFoundError:
            found = set()
        return found.intersection(keys)

    def sha256(self, key: str) -> str:
        return hashlib.sha256(self.read_bytes(key)).hexdigest()

    def zarr_store(self) -> Any:
        if self.local:
            return zarr.storage.LocalStore(self.path)
        return zarr.storage.FsspecStore.from_url(self.url)

    def refresh(self) -> None:
        """Forget cached listings (another rank may have written since)."""
        if not self.local:
            self.fs.invalidate_cache()

    # ---- records: the JSON documents of a store (see `cospress.store.records`) --------------------
    def read_record(self, key: str) -> Any:
        """The document of record ``key`` (FileNotFoundError, json.JSONDecodeError as reading raises)."""
        return records.read_record(self.path, key) if self.local else loads(self.read_bytes(key))

    def write_record(self, key: str, doc: dict, paths: StorePaths) -> None:
        """Write a record; from 2.0 the group nodes above it (``cospress/``, ``commits/``) first.
        Locally through `records.write_record` (a temp file of its own: threads share group nodes)."""
        if self.local:
            records.write_record(self.path, key, doc, paths)
            return
        if not paths.legacy:
            parts = key.split("/")[:-2]
            for i in range(1, len(parts) + 1):
                node = "/".join([*parts[:i], "zarr.json"])
                if not self.exists(node):
                    self.write_bytes(node, _json({**_GROUP, "attributes": {}}))
        self.write_bytes(key, _json(encode(doc, paths)))

    def remove_record(self, key: str, paths: StorePaths) -> None:
        if self.local:
            records.remove_record(self.path, key, paths)
        else:
            self.remove(key)


def _json(doc: Any) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode()


__all__ = ["Dest", "is_url"]
