"""WebDataset tar shards as a random-access source (``wds:PATTERN``): a member index per tar, read by byte range."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tarfile
import threading
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from cospress import netio
from cospress.data.base import Source
from cospress.data.wds_index import cached_index as _cached_index
from cospress.errors import BadImageError, SourceError
from cospress.utils import redact_text

log = logging.getLogger(__name__)

WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def _wds_split(name: str) -> tuple[str, str] | None:
    """(key, lower-case extension) of a tar member: the key runs to the first dot of the basename."""
    d, _, base = name.rpartition("/")
    if base.startswith(".") or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (f"{d}/{stem}" if d else stem), ext.lower()


def _label_from(ext: str, data: bytes) -> int:
    try:
        if ext == "cls":
            return int(data.decode().strip())
        obj = json.loads(data)
        for field in ("label", "cls"):
            if isinstance(obj, dict) and isinstance(obj.get(field), (int, float)):
                return int(obj[field])
    except (ValueError, UnicodeDecodeError):
        pass
    return -1


def _remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def _open_binary(url: str):
    if _remote(url):
        import fsspec

        return fsspec.open(url, "rb", **netio.with_timeouts(url)).open()
    return open(url.removeprefix("file://"), "rb")


class WdsSource(Source):
    """``wds:PATTERN``: uncompressed tar shards indexed once at open (member -> offset, size)."""

    kind = "wds"

    def __init__(self, spec: str, pattern: str) -> None:
        from braceexpand import braceexpand

        self.shards = list(braceexpand(pattern))
        shown = redact_text(spec)  # errors never print a URL's credentials or query
        # the member index, as arrays (per sample: its shard, and the offset and size of its image
        # member, -1 when it has none): ~20 B per sample, built once per tar and cached (local tars)
        parts = [
            _cached_index(url, lambda url=url, s=s: self._indexed(shown, s, url))
            for s, url in enumerate(self.shards)
        ]
        keys = [k for p in parts for k in p["keys"].tolist()]
        if not keys:
            raise SourceError(f"{shown}: the shards hold no samples; check the pattern")
        self._shard = np.concatenate([np.full(len(p["keys"]), s, np.int32) for s, p in enumerate(parts)])
        self._offset = np.concatenate([p["offset"] for p in parts]).astype(np.int64)
        self._size = np.concatenate([p["size"] for p in parts]).astype(np.int64)
        labels = np.concatenate([p["labels"] for p in parts]).astype(np.int64).tolist()
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()
        self._lock = threading.Lock()
        super().__init__(spec, pattern, keys, labels)

    def _indexed(self, spec: str, s: int, url: str) -> dict[str, np.ndarray]:
        """`_index_shard`, a remote shard read again after a transient failure (`cospress.netio`)."""
        if not _remote(url):
            return self._index_shard(spec, s, url)
        return netio.retry(lambda: self._index_shard(spec, s, url), f"shard {url} of {spec}")

    def _index_shard(self, spec: str, s: int, url: str) -> dict[str, np.ndarray]:
        """The member index of shard ``s`` at ``url`` (keys, labels, image offset and size, -1 for
        none); ``spec`` is the redacted spec, for errors."""
        keys: list[str] = []
        labels: list[int] = []
        members_of: list[dict[str, tuple[int, int]]] = []
        try:
            f = _open_binary(url)
        except (OSError, ValueError) as e:
            if _remote(url) and netio.transient(e):
                raise  # retried (cospress.netio)
            raise SourceError(
                f"{spec}: cannot open shard {redact_text(url)}: {redact_text(str(e))}; check the pattern"
            ) from None
        url = redact_text(url)  # from here on, only for messages
        where: dict[str, int] = {}
        with f:
            try:
                tf = tarfile.open(fileobj=f, mode="r:")
            except tarfile.TarError as e:
                raise SourceError(
                    f"{spec}: {url} is not an uncompressed tar ({e}); use .tar shards"
                ) from None
            for m in tf:
                name = m.name
                parts = PurePosixPath(name).parts
                if name.startswith("/") or ".." in parts:
                    raise SourceError(f"{spec}: unsafe member path {name!r} in {url}; rebuild the shard")
                if not m.isfile():
                    continue
                split = _wds_split(name)
                if split is None:
                    continue
                key, ext = split
                row = where.get(key)
                if row is None:
                    row = where[key] = len(keys)
                    keys.append(key)
                    labels.append(-1)
                    members_of.append({})
                members = members_of[row]
                if ext in members:
                    raise SourceError(f"{spec}: duplicate member {name!r} in {url}; keys must be unique")
                members[ext] = (m.offset_data, m.size)
                if ext in ("cls", "json") and m.size <= 1 << 16 and (ext == "cls" or labels[row] < 0):
                    f.seek(m.offset_data)
                    data = f.read(m.size)
                    if len(data) != m.size:
                        raise netio.ShortRead(f"{url}: {len(data)} of {m.size} bytes of {name!r}")
                    labels[row] = _label_from(ext, data)
        image = [next((m[e] for e in WDS_IMAGE_EXTENSIONS if e in m), (-1, -1)) for m in members_of]
        return {
            "keys": np.array(keys, dtype=np.str_),
            "labels": np.array(labels, dtype=np.int64),
            "offset": np.array([o for o, _ in image], dtype=np.int64),
            "size": np.array([z for _, z in image], dtype=np.int64),
        }

    def _select(self, rows: list[int]) -> None:
        super()._select(rows)
        self._shard, self._offset, self._size = self._shard[rows], self._offset[rows], self._size[rows]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = {}
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        with self._lock:
            if self._pid != os.getpid():  # forked: never share file positions with the parent
                self._handles, self._pid = {}, os.getpid()
            f = self._handles.get(shard)
            if f is None:
                f = self._handles[shard] = _open_binary(self.shards[shard])
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise netio.ShortRead(f"{len(data)} of {size} bytes")
        return data

    def _drop(self, shard: int) -> None:
        """Forget shard ``shard``'s handle after a failed read: the next try opens a new one."""
        with self._lock:
            f = self._handles.pop(shard, None)
        if f is not None:
            with contextlib.suppress(Exception):
                f.close()

    def image_members(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tar, offset, size) of the image member of each sample at ``positions`` (offset -1: none),
        for a reader that fetches byte ranges of the tars itself (stage 2's stream reader)."""
        p = np.asarray(positions, dtype=np.int64)
        return self._shard[p], self._offset[p], self._size[p]

    def read_bytes(self, i: int) -> bytes:
        """The image bytes of sample ``i``. A remote read is retried (`cospress.netio`) and then raises
        NetworkError, never BadImageError: a failed read is not a bad image and is never skipped."""
        i = self._check_index(i)
        if self._offset[i] < 0:
            raise BadImageError(f"not an image: sample has no {'/'.join(WDS_IMAGE_EXTENSIONS)} member")
        shard, offset, size = int(self._shard[i]), int(self._offset[i]), int(self._size[i])
        if _remote(self.shards[shard]):
            what = f"sample {self._keys[i]!r} of {self.shards[shard]} ({self.shown})"
            return netio.retry(lambda: self._read(shard, offset, size), what, lambda: self._drop(shard))
        try:
            return self._read(shard, offset, size)
        except OSError as e:
            raise BadImageError(f"unreadable: {redact_text(str(e))}") from None

    def close(self) -> None:
        with self._lock:
            for f in self._handles.values():
                f.close()
            self._handles = {}
