"""Read a complete feature store from a local path or any fsspec URL (file://, http(s)://, s3://, gs://).

A store without manifest.json is incomplete and refused; so is one whose schema major version this
code does not know. Rows are fetched by byte range from the sharded arrays; ``cache_dir`` keeps a
local copy of the shard files a remote read touched.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import zarr
from zarr.core.sync import sync as zarr_sync

from cospress.errors import CospressError, StoreError
from cospress.netio import RetryingStore, retry, with_timeouts
from cospress.store import manifest as mf
from cospress.store import records
from cospress.store.checks import ReaderChecks
from cospress.store.codecs import decode_tokens
from cospress.store.guard import GuardedStore, check_local_sizes, check_scale, chunk_spec
from cospress.store.layout import StoreLayout
from cospress.store.metadata import check_array
from cospress.store.projection import read_projection
from cospress.store.records import LEGACY, NEW
from cospress.store.remote import FileCacheStore, check_range_support, is_local
from cospress.store.schema import validate_manifest
from cospress.utils import redact_text, redact_url

log = logging.getLogger(__name__)


class StoreReader(ReaderChecks):
    """A read-only view of a complete store.

    Attributes: ``manifest`` (dict), ``layout`` (`StoreLayout`), ``num_rows`` N, ``num_views`` V
    (the stored views), ``dim`` Dt, ``num_tokens`` T, ``has_tokens``, ``param_names`` (P names of
    the recorded view params), ``num_shards``.
    """

    def __init__(
        self, url: str | os.PathLike, cache_dir: str | None = None, storage_options: dict | None = None
    ):
        self.url = str(url)
        self.cache_dir = cache_dir
        self.storage_options = dict(storage_options or {})
        self.display = redact_url(self.url)
        self._opened: dict[str, zarr.Array] | None = None
        self._guarded(self._open)

    def _guarded(self, step: Callable[[], Any]) -> Any:
        """``step()``, with any error but a StoreError turned into a one-line StoreError."""
        try:
            return step()
        except CospressError:  # StoreError, NetworkError (cospress.netio): one line already
            raise
        except Exception as e:
            # fsspec / aiohttp errors may quote the URL with its credentials: never show them
            raise StoreError(
                f"cannot read the store {self.display}: {redact_text(f'{type(e).__name__}: {e}')}; "
                "check the URL, the network and the credentials (storage options)"
            ) from None

    def _open(self) -> None:
        if is_local(self.url):
            self._fs: fsspec.AbstractFileSystem = fsspec.filesystem("file")
            self._root = str(Path(self.url).resolve())
        else:
            self._fs, self._root = fsspec.core.url_to_fs(
                self.url, **with_timeouts(self.url, self.storage_options)
            )
            self._root = self._root.rstrip("/")
        self.manifest = self._read_manifest()
        m = self.manifest
        self.layout = StoreLayout.from_manifest(m)
        self.num_rows, self.stored_views = self.layout.num_rows, self.layout.stored_views
        self.dim, self.num_tokens = self.layout.dim, self.layout.num_tokens
        self.has_tokens, self.num_params = self.layout.tokens, self.layout.num_params
        self.param_names = list(m.get("param_names") or [f"p{i}" for i in range(self.num_params)])
        self.shard_size = self.layout.shard_size
        self.num_shards = len(m["shards"])
        if self.url.startswith(("http://", "https://")):
            check_range_support(self._fs, self._path(mf.shard_file_key("cls", 0, 3)), self.display)
        self._direct: dict[str, Any] = {}
        self._keys: list[str] | None = None
        self._cols: tuple[np.ndarray, np.ndarray] | None = None
        self._projection: Any = None
        self._specs: dict[str, Any] = {}
        self.base_views = self.stored_views  # the views of this store's own arrays
        self.extensions: list[Any] = []
        from cospress.store.extensions import open_extensions

        open_extensions(self)  # sets extensions, stored_views and layout when the store has some

    def __reduce__(self) -> tuple:
        return (type(self), (self.url, self.cache_dir, self.storage_options))

    def _path(self, key: str) -> str:
        return f"{self._root}/{key}"

    def _cat(self, key: str) -> bytes:
        """The bytes of file ``key`` of the store, a remote read retried (`cospress.netio`)."""
        if is_local(self.url):
            return self._fs.cat_file(self._path(key))
        return retry(lambda: self._fs.cat_file(self._path(key)), f"the store {self.display} ({key})")

    def _read_manifest(self) -> dict:
        """The manifest (schema 2.0: ``cospress/manifest/zarr.json``; before: ``manifest.json``); sets
        ``paths``, the store's record layout."""
        for paths in (NEW, LEGACY):
            try:
                raw = self._cat(paths.manifest)
                break
            except FileNotFoundError:
                continue
        else:
            self._missing_manifest()
        self.paths = paths
        try:
            manifest = records.loads(raw)
        except json.JSONDecodeError as e:
            raise StoreError(
                f"{self.display}/{paths.manifest} is not valid JSON ({e}); re-upload or re-extract the store"
            ) from None
        return validate_manifest(manifest, self.display)

    def _missing_manifest(self) -> None:
        # nothing there at all (e.g. a bucket that does not exist); an HTTP server cannot list a
        # folder, so a store's own files are asked for first
        identities = [self._path(p.identity) for p in (NEW, LEGACY)]
        if not any(self._fs.exists(p) for p in (*identities, self._path("zarr.json"), self._root)):
            raise StoreError(f"nothing is at {self.display}: check the path or URL")
        created = any(self._fs.exists(p) for p in identities)
        what = "it is incomplete" if created else "it is incomplete or not a store"
        raise StoreError(
            f"{self.display} has no manifest (the file written last): {what} (extraction still running "
            "or interrupted, or a partial upload); rerun extract-teacher with the same arguments to finish it, "
            "or finish the upload"
        )

    def _zarr_store(self) -> Any:
        """The store's files as a read-only zarr store, behind the checks of
        `cospress.store.guard.GuardedStore` (and the verified cache of ``cache_dir``)."""
        if is_local(self.url):
            return GuardedStore(
                zarr.storage.LocalStore(self._root, read_only=True), self.display, self._root, self._specs
            )
        store = zarr.storage.FsspecStore.from_url(
            self.url, storage_options=with_timeouts(self.url, self.storage_options), read_only=True
        )
        store = RetryingStore(store, self.display)  # transient failures retried (cospress.netio)
        if self.cache_dir is not None:
            store = FileCacheStore(store, self.cache_dir, self._fs, self._root, self.manifest, self.display)
        return GuardedStore(store, self.display, None, self._specs)

    @property
    def _arrays(self) -> dict[str, zarr.Array]:
        """The arrays, opened on first use and checked against the manifest (dtype, shape, codecs):
        `verify` and `summary` still run on a store whose metadata was changed; reads refuse it."""
        if self._opened is None:
            self._opened = self._guarded(self._open_arrays)
        return self._opened

    def _open_arrays(self) -> dict[str, zarr.Array]:
        store = self._zarr_store()
        arrays = {}
        for name in self.manifest["shapes"]:
            try:
                arrays[name] = zarr.open_array(store=store, path=name, mode="r")
            except (FileNotFoundError, KeyError, ValueError, TypeError) as e:
                raise StoreError(
                    f"{self.display}: {name}/zarr.json cannot be opened ({type(e).__name__}: {str(e)[:120]}); "
                    "the store is corrupted: re-extract or re-upload it"
                ) from None
        for name, arr in arrays.items():  # dtype, shape and codecs as the manifest says
            meta = arr.metadata.to_dict()
            check_array(name, meta, self.manifest, self.display)
            self._specs[name] = chunk_spec(name, meta, self.display)
        if is_local(self.url):
            check_local_sizes(self.manifest, self._root, self.display)
        return arrays

    # ---- whole-store columns ------------------------------------------------------------------
    def keys(self) -> list[str]:
        """The N sample keys, in row order."""
        return list(self._keys_cached())

    def _keys_cached(self) -> list[str]:
        if self._keys is None:
            # [:N]: rows past the manifest (an append in progress) are never touched
            self._keys = [str(k) for k in self._arrays["keys"][: self.num_rows]]
        return self._keys

    def labels(self) -> np.ndarray:
        """int64 [N] class labels (-1 when unknown)."""
        return np.asarray(self._arrays["labels"][: self.num_rows], dtype=np.int64)

    def valid(self) -> np.ndarray:
        """bool [N]: False where the input was skipped (its features are zeros)."""
        return np.asarray(self._arrays["valid"][: self.num_rows]).astype(bool)

    def valid_rows(self) -> np.ndarray:
        """int64 indices of the valid rows."""
        return np.flatnonzero(self.valid()).astype(np.int64)

    # ---- rows ---------------------------------------------------------------------------------
    def _rows(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        self._arrays  # noqa: B018 - the store's files checked before anything sized by its manifest is built
        r = np.asarray(rows, dtype=np.int64).reshape(-1)
        if r.size and (r.min() < 0 or r.max() >= self.num_rows):
            raise StoreError(f"row index out of range: the store has {self.num_rows} rows")
        return r

    def read_rows(
        self,
        rows: Sequence[int] | np.ndarray,
        views: Sequence[Sequence[int]] | np.ndarray | None = None,
        tokens: bool = True,
        raw: bool = False,
    ) -> dict[str, Any]:
        """Read rows (any order, repeats allowed).

        ``views``: per row, the view indices to return (same count v for every row), or None for
        all V. Returns cls float16 [n, v, Dt], tokens float16 [n, v, T, Dt] (None when the store
        has none or ``tokens=False``; decoded from the store's token codec), views float32 [n, v, P],
        labels int64 [n], valid bool [n], keys list[str], rows int64 [n]. ``raw``: tokens as stored
        (int8 [n, v, T, token_dim] for int8 / pca) and ``token_scale`` float16 [n, v, T] (None for fp16).
        With view extensions, view j of base + extensions (`cospress.store.extensions.view_map`).
        """
        if self.extensions:
            from cospress.store.extensions import read_extended

            return read_extended(self, rows, views, tokens, raw)
        return self._read_base(rows, views, tokens, raw)

    def _read_base(
        self, rows: Any, views: Any = None, tokens: bool = True, raw: bool = False
    ) -> dict[str, Any]:
        """`read_rows` of this store's own arrays (its ``base_views`` views)."""
        r = self._rows(rows)
        uniq, inv = np.unique(r, return_inverse=True)
        sel = None
        if views is not None:
            sel = np.asarray(views, dtype=np.int64)
            if sel.ndim != 2 or sel.shape[0] != r.size:
                raise StoreError(
                    f"views must give the same number of view indices for each of the {r.size} rows"
                )
            if sel.size and (sel.min() < 0 or sel.max() >= self.base_views):
                raise StoreError(
                    f"view index out of range: the store has {self.base_views} stored views per row"
                )
        out: dict[str, Any] = {"rows": r}
        for name in ("cls", "views"):
            data = self._gather(name, [(int(i),) for i in uniq])[inv]  # one row = one inner chunk
            out[name] = data if sel is None else np.take_along_axis(data, sel[:, :, None], axis=1)
        out["tokens"], out["token_scale"] = None, None
        if tokens and self.has_tokens:
            out["tokens"], out["token_scale"] = self._tokens(
                self._read_tokens("tokens", r, sel), self._read_tokens("token_scale", r, sel) if self._lossy else None,
                raw,
            )  # fmt: skip
        if not raw:
            del out["token_scale"]
        labels, valid, keys = self._columns()
        out["labels"] = labels[r]
        out["valid"] = valid[r]
        out["keys"] = [keys[i] for i in r]
        return out

    @property
    def _lossy(self) -> bool:
        return self.layout.token_codec != "fp16"

    @property
    def projection(self) -> Any:
        """The stored projection of a pca store (`cospress.store.codecs.Projection`), else None."""
        if self.layout.token_codec != "pca" or not self.has_tokens:
            return None
        if self._projection is None:
            self._projection = self._guarded(
                lambda: read_projection(self._zarr_store(), self.manifest, self.display)
            )
        return self._projection

    def _tokens(self, stored: np.ndarray, scale: np.ndarray | None, raw: bool) -> tuple[Any, Any]:
        """(tokens, token_scale) as `read_rows` returns them: decoded float16 unless ``raw``."""
        if scale is not None:
            check_scale(scale, self.display)
        if raw or not self._lossy:
            return stored, scale
        return decode_tokens(self.layout.token_codec, stored, scale, self.projection), None

    def _read_tokens(self, name: str, r: np.ndarray, sel: np.ndarray | None) -> np.ndarray:
        """``tokens`` [n, v, T, token_dim] or ``token_scale`` [n, v, T]: each needed (row, view) chunk
        is fetched once, all concurrently."""
        shape = self.manifest["shapes"][name][2:]
        dtype = np.dtype(self.layout.dtype(name))
        if sel is None:  # whole rows: one read per row covers its V chunks
            uniq, inv = np.unique(r, return_inverse=True)
            if not uniq.size:
                return np.zeros((0, self.base_views, *shape), dtype)
            return self._gather(name, [(int(i),) for i in uniq])[inv]
        pairs = np.stack([np.repeat(r, sel.shape[1]), sel.reshape(-1)], axis=1)
        if not pairs.size:
            return np.zeros((r.size, sel.shape[1], *shape), dtype)
        uniq, inv = np.unique(pairs, axis=0, return_inverse=True)
        data = self._gather(name, [(int(i), int(v)) for i, v in uniq])
        return data[inv.reshape(-1)].reshape(r.size, sel.shape[1], *shape)

    def _direct_reader(self, name: str) -> Any:
        """A :class:`~cospress.store.shardio.ShardFileReader` for a local array whose codecs it
        handles, else None (zarr reads it). ~10x faster than zarr per inner chunk."""
        if name not in self._direct:
            from cospress.store.shardio import ShardFileReader, ShardLayout

            layout = None
            if is_local(self.url):
                layout = ShardLayout.from_metadata(self._arrays[name].metadata.to_dict())
            self._direct[name] = (
                ShardFileReader(Path(self._root) / name, layout, self.display) if layout else None
            )
        return self._direct[name]

    def _gather(self, name: str, selections: list[tuple[int, ...]], batch: int = 1024) -> np.ndarray:
        """Stack ``arr[sel]`` for each selection: straight from local shard files, else through zarr,
        read concurrently (latency-bound over a network)."""
        arr = self._arrays[name]
        if not selections:
            return np.zeros((0, *arr.shape[1:]), arr.dtype)
        direct = self._direct_reader(name)
        if direct is not None:
            return np.stack([direct.read(sel) for sel in selections])
        aa = arr._async_array

        async def run(part: list[tuple[int, ...]]) -> list[Any]:
            return await asyncio.gather(*[aa.getitem(sel) for sel in part])

        parts: list[Any] = []
        for i in range(0, len(selections), batch):
            parts.extend(zarr_sync(run(selections[i : i + batch])))
        return np.stack([np.asarray(p) for p in parts])

    def _columns(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """labels int64 [N], valid bool [N] and keys, read once and kept in memory."""
        if self._cols is None:
            self._cols = (self.labels(), self.valid())
        return self._cols[0], self._cols[1], self._keys_cached()

    def read_shard(self, shard: int, raw: bool = False) -> dict[str, Any]:
        """Every array of one shard, as `read_rows` returns them (all views; ``raw`` likewise)."""
        if not 0 <= shard < self.num_shards:
            raise StoreError(f"shard {shard} is out of range: the store has {self.num_shards} shards")
        start, stop = self.manifest["shards"][shard]["rows"]
        a = self._arrays

        def rows(name: str) -> np.ndarray:
            direct = self._direct_reader(name)
            if direct is not None and start == shard * self.shard_size:
                return direct.read_shard(shard, stop - start)
            return np.asarray(a[name][start:stop])

        tokens, scale = None, None
        if self.has_tokens:
            tokens, scale = self._tokens(rows("tokens"), rows("token_scale") if self._lossy else None, raw)
        out = {
            "rows": np.arange(start, stop, dtype=np.int64),
            "cls": rows("cls"),
            "tokens": tokens,
            "views": rows("views"),
            "labels": np.asarray(a["labels"][start:stop], dtype=np.int64),
            "valid": np.asarray(a["valid"][start:stop]).astype(bool),
            "keys": [str(k) for k in a["keys"][start:stop]],
        }
        if raw:
            out["token_scale"] = scale
        return out
