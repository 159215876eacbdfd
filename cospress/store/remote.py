"""Reading a store over a network: byte-range support of a server and a local file cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fsspec
import zarr
from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype

from cospress.errors import StoreError
from cospress.netio import retry
from cospress.utils import atomic_write_bytes, redact_url


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
    """Read-through cache: the first read of a key fetches the whole file into ``cache_dir``;
    every read (ranged or not) is then served from the local copy."""

    def __init__(self, store: zarr.abc.store.Store, cache_dir: str):
        super().__init__(store)
        self._cache_dir = Path(cache_dir)
        self._local = zarr.storage.LocalStore(cache_dir, read_only=True)

    def _with_store(self, store: zarr.abc.store.Store) -> FileCacheStore:
        return type(self)(store, str(self._cache_dir))

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        if not (self._cache_dir / key).is_file():
            full = await self._store.get(key, prototype)
            if full is None:
                return None
            atomic_write_bytes(self._cache_dir / key, full.to_bytes())
        return await self._local.get(key, prototype, byte_range)

    async def get_partial_values(self, prototype: BufferPrototype, key_ranges: Any) -> list[Buffer | None]:
        return [await self.get(key, prototype, rng) for key, rng in key_ranges]
