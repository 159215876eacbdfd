"""The member index of a WebDataset tar, cached: built once per tar (a full read of it), then loaded.

An index is four arrays per tar (keys, labels, image offset, image size; -1 for a sample without an
image member), ~20 B per sample plus its key, saved as an ``.npz`` under ``$COSPRESS_CACHE_DIR``
(default ``~/.cache/cospress``) ``/wds-index/``, named by the sha256 of the tar's real path, size,
modification and change times and inode: a changed tar gets a new entry, a damaged entry is rebuilt. Tars read from a URL
are indexed in each process (not cached).
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
    """Where the index of the local tar ``url`` is cached; None for a URL or a missing file."""
    if "://" in url and not url.startswith("file://"):
        return None
    path = os.path.realpath(url.removeprefix("file://"))
    try:
        st = os.stat(path)
    except OSError:
        return None
    stamp = f"{INDEX_VERSION}\0{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}"
    tag = hashlib.sha256(stamp.encode()).hexdigest()
    return cache_root() / f"{tag[:32]}.npz"


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
