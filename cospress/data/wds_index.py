"""The member index of a WebDataset tar, cached: built once per tar (a full read of it), then loaded.

An index is four arrays per tar (keys, labels, image offset, image size; -1 for a sample without an
image member), ~20 B per sample plus its key, saved as an ``.npz`` under ``$COSPRESS_CACHE_DIR``
(default ``~/.cache/cospress``) ``/wds-index/``, named by the sha256 of the tar's real path, size,
modification and change times and inode (a tar at a URL: its address, and the size and ETag or
modification time its server reports): a changed tar gets a new entry, a damaged entry is rebuilt. A
tar whose server reports no version is indexed in each process.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cospress.utils import atomic_write_bytes

INDEX_VERSION = 1
FIELDS = ("keys", "labels", "offset", "size")


def cache_root() -> Path:
    return Path(os.environ.get("COSPRESS_CACHE_DIR") or "~/.cache/cospress").expanduser() / "wds-index"


def entry_path(url: str) -> Path | None:
    """Where the index of the tar at ``url`` is cached: a local tar by its real path, size, times and
    inode; a tar at a URL by its address (no query string) and the size and version (ETag or
    modification time) the server reports, one metadata request. None: a missing file, or a server
    that reports no version (such a tar is indexed in each process)."""
    if "://" in url and not url.startswith("file://"):
        stamp = _remote_stamp(url)
    else:
        path = os.path.realpath(url.removeprefix("file://"))
        try:
            st = os.stat(path)
        except OSError:
            return None
        stamp = f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}"
    if stamp is None:
        return None
    tag = hashlib.sha256(f"{INDEX_VERSION}\0{stamp}".encode()).hexdigest()
    return cache_root() / f"{tag[:32]}.npz"


_VERSION_FIELDS = ("ETag", "etag", "LastModified", "last_modified", "Last-Modified", "mtime", "generation")


def _remote_stamp(url: str) -> str | None:
    """The address, size and version of a remote tar (its credentials are only hashed, never stored)."""
    import fsspec

    from cospress import netio

    try:
        fs, path = fsspec.core.url_to_fs(url, **netio.with_timeouts(url))
        info = fs.info(path)
    except Exception:  # any failure here only means "not cached": the index read reports real errors
        return None
    version = next((info[f] for f in _VERSION_FIELDS if info.get(f)), None)
    if version is None or info.get("size") is None:
        return None
    return f"{url.split('?', 1)[0]}\0{info['size']}\0{version}"


def cached_index(url: str, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The index of the tar at ``url``: from the cache when a good entry is there, else ``build()``
    (then saved; a cache that cannot be written is skipped)."""
    path = entry_path(url)
    if path is not None and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                idx = {k: z[k] for k in FIELDS}
            if len({len(v) for v in idx.values()}) == 1:
                return idx
        except (OSError, ValueError, KeyError, EOFError):
            pass  # damaged: rebuilt below
    idx = build()
    if path is not None:
        buf = io.BytesIO()
        np.savez(buf, **{k: idx[k] for k in FIELDS})
        try:
            atomic_write_bytes(path, buf.getvalue())
        except OSError:
            pass
    return idx
