"""Direct encoding and decoding of the store's shard files, for the local hot paths.

A shard file is a Zarr v3 ``sharding_indexed`` blob: the encoded inner chunks one after another,
then an index of ``(offset, nbytes)`` uint64 pairs per inner chunk (C order over the shard's chunk
grid, little-endian) and the CRC32C of that index. See the Zarr v3 sharding codec specification,
https://zarr-specs.readthedocs.io/en/latest/v3/codecs/sharding-indexed/v1.0.html .

zarr-python costs ~1 ms per inner chunk (its asyncio pipeline); a store keeps one chunk per (row,
view) of ``tokens``, so a 128-image x 8-view shard is ~1,000 chunks. The functions here do one blosc
call per chunk and one read or write per file, byte-identical to zarr-python's files (same codec
settings, same chunk order), so either side reads what the other wrote.

Only the codec chains cospress creates are handled here (``bytes`` little-endian + ``blosc``,
index ``bytes`` + ``crc32c`` at the end); :meth:`ShardLayout.from_metadata` returns None for
anything else and callers fall back to zarr.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
from numcodecs import Blosc

from cospress.errors import StoreError
from cospress.store.guard import ChunkSpec, blosc_problem

__all__ = ["ShardLayout", "ShardFileReader", "ShardBlob", "encode_shard", "shard_parts", "write_shard_file"]

_EMPTY = np.uint64(2**64 - 1)  # offset and nbytes of a chunk that is not stored
_SHUFFLE = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}


@functools.lru_cache(maxsize=32)
def _chunk_order(grid: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """The order zarr-python writes inner chunks in (Morton order), else C order: readers need no
    order (the index says where each chunk is); zarr's keeps the files byte-identical to zarr's."""
    try:
        from zarr.core.indexing import morton_order_iter

        return tuple(tuple(int(v) for v in c) for c in morton_order_iter(grid))
    except Exception:  # a zarr version without it: C order is as valid
        return tuple(product(*(range(g) for g in grid)))


@dataclass(frozen=True)
class ShardLayout:
    """What is needed to encode or decode one array's shard files without zarr."""

    shape: tuple[int, ...]  # the array's shape
    shard: tuple[int, ...]  # shard shape (rows of a shard along axis 0, full extent elsewhere)
    chunk: tuple[int, ...]  # inner chunk shape
    dtype: np.dtype
    fill_value: Any
    blosc: dict[str, Any]  # cname, clevel, shuffle, blocksize, typesize

    @classmethod
    def from_metadata(cls, meta: dict) -> ShardLayout | None:
        """The layout of an array from its ``zarr.json`` dict; None when its codecs are not the ones
        handled here (then use zarr)."""
        try:
            (sharding,) = meta["codecs"]
            if sharding["name"] != "sharding_indexed":
                return None
            conf = sharding["configuration"]
            inner = conf["codecs"]
            index = conf["index_codecs"]
            ok = (
                conf.get("index_location", "end") == "end"
                and [c["name"] for c in inner] == ["bytes", "blosc"]
                and inner[0].get("configuration", {}).get("endian", "little") == "little"
                and [c["name"] for c in index] == ["bytes", "crc32c"]
                and index[0].get("configuration", {}).get("endian", "little") == "little"
                and meta["chunk_grid"]["name"] == "regular"
                and meta["chunk_key_encoding"]["name"] == "default"
                and meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/") == "/"
            )
            if not ok:
                return None
            dtype = np.dtype(meta["data_type"]).newbyteorder("<")
            blosc = dict(inner[1]["configuration"])
            if blosc.get("shuffle") not in _SHUFFLE or not blosc.get("typesize"):
                return None
            shard = tuple(int(v) for v in meta["chunk_grid"]["configuration"]["chunk_shape"])
            chunk = tuple(int(v) for v in conf["chunk_shape"])
            if len(shard) != len(chunk) or any(s % c for s, c in zip(shard, chunk, strict=True)):
                return None
            return cls(
                shape=tuple(int(v) for v in meta["shape"]),
                shard=shard,
                chunk=chunk,
                dtype=dtype,
                fill_value=meta.get("fill_value", 0),
                blosc=blosc,
            )
        except (KeyError, TypeError, ValueError):
            return None

    @property
    def grid(self) -> tuple[int, ...]:
        """Inner chunks per shard along each axis."""
        return tuple(s // c for s, c in zip(self.shard, self.chunk, strict=True))

    def codec(self) -> Blosc:
        b = self.blosc
        shuffle, blocksize, typesize = _SHUFFLE[b["shuffle"]], int(b.get("blocksize", 0)), int(b["typesize"])
        return Blosc(b["cname"], int(b["clevel"]), shuffle, blocksize, typesize=typesize)

    def index_nbytes(self) -> int:
        return int(np.prod(self.grid)) * 16 + 4


def encode_shard(layout: ShardLayout, rows: np.ndarray) -> bytes:
    """The bytes of one shard file holding ``rows``: :func:`shard_parts` joined."""
    return b"".join(shard_parts(layout, rows))


def shard_parts(layout: ShardLayout, rows: np.ndarray) -> Iterator[bytes]:
    """The bytes of one shard file holding ``rows`` (the shard's rows, at most ``layout.shard[0]``), part
    by part: each encoded inner chunk, then the index and its CRC32C. In a short last shard, chunks past
    the end are not stored and a chunk that straddles it is padded with the fill value, as zarr does;
    every other inner chunk is stored, even when all fill. A generator: :func:`write_shard_file` hashes
    and writes each chunk as it comes, so no shard-sized buffer is allocated (and page-faulted) per shard.
    """
    rows = np.asarray(rows)
    n = rows.shape[0]
    if tuple(rows.shape[1:]) != layout.shard[1:] or n > layout.shard[0]:
        raise StoreError(f"a shard of shape {layout.shard} cannot hold rows of shape {rows.shape}")
    data = np.ascontiguousarray(rows, dtype=layout.dtype)
    if n < layout.shard[0] and -(-n // layout.chunk[0]) * layout.chunk[0] > n:  # a straddling chunk
        pad = np.full((layout.shard[0] - n, *layout.shard[1:]), layout.fill_value, dtype=layout.dtype)
        data = np.concatenate([data, pad])
    codec = layout.codec()
    index = np.full((*layout.grid, 2), _EMPTY, dtype="<u8")
    offset = 0
    for coords in _chunk_order(layout.grid):
        if coords[0] * layout.chunk[0] >= n:  # past the end of the array: not stored (as zarr does)
            continue
        sel = tuple(slice(c * k, (c + 1) * k) for c, k in zip(coords, layout.chunk, strict=True))
        enc = codec.encode(np.ascontiguousarray(data[sel]).view(np.uint8).reshape(-1))
        index[coords] = (offset, len(enc))
        offset += len(enc)
        yield enc
    index_bytes = index.tobytes()
    yield index_bytes + np.uint32(google_crc32c.value(index_bytes)).astype("<u4").tobytes()


class ShardFileReader:
    """Reads inner chunks of one array's local shard files, keeping each shard's index and an open
    file handle (a few at a time), so a chunk costs one ``pread`` and one blosc decode.

    Store files never change once committed (a rewrite goes to a fresh store or a new shard), so the
    cached indexes stay valid for the life of a reader. Safe to share between threads.
    """

    def __init__(
        self, array_dir: str | os.PathLike, layout: ShardLayout, where: str | None = None, max_open: int = 16
    ) -> None:
        self.dir = Path(array_dir)
        self.layout = layout
        self.where = where or str(self.dir.parent)
        self.chunk_nbytes = int(np.prod(layout.chunk)) * layout.dtype.itemsize
        self.codec = layout.codec()
        self.max_open = max_open
        self._files: OrderedDict[tuple[int, ...], tuple[int, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            for fd, _ in self._files.values():
                os.close(fd)
            self._files.clear()

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self) -> dict:  # file handles do not cross process boundaries
        return {"dir": self.dir, "layout": self.layout, "where": self.where, "max_open": self.max_open}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["dir"], state["layout"], state["where"], state["max_open"])

    def _open(self, shard: tuple[int, ...]) -> tuple[int, np.ndarray]:
        with self._lock:
            hit = self._files.get(shard)
            if hit is not None:
                self._files.move_to_end(shard)
                return hit
        path = self._name(shard)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise StoreError(f"shard file {path} is missing; run `cospress verify` on the store") from None
        size = os.fstat(fd).st_size
        want = self.layout.index_nbytes()
        raw = os.pread(fd, want, size - want) if size >= want else b""
        if len(raw) != want:
            os.close(fd)
            raise StoreError(f"shard file {path} is truncated; run `cospress verify` on the store")
        body, crc = raw[:-4], int(np.frombuffer(raw[-4:], "<u4")[0])
        if google_crc32c.value(body) != crc:
            os.close(fd)
            raise StoreError(
                f"the index of shard file {path} is corrupted; run `cospress verify` on the store"
            )
        problem = ChunkSpec("", "blosc", self.chunk_nbytes, len(body) // 16).index_problem(raw, size)
        if problem:
            os.close(fd)
            raise StoreError(
                f"{self.where}: shard file {path} is corrupted: {problem}; run `cospress verify` on the store"
            )
        index = np.frombuffer(body, "<u8").reshape(*self.layout.grid, 2)
        with self._lock:
            self._files[shard] = (fd, index)
            while len(self._files) > self.max_open:
                _, (old_fd, _) = self._files.popitem(last=False)
                os.close(old_fd)
        return fd, index

    def read_chunk(self, coords: tuple[int, ...]) -> np.ndarray:
        """The inner chunk at chunk-grid coordinates ``coords`` (shape ``layout.chunk``)."""
        lay = self.layout
        grid = lay.grid
        shard = tuple(c // g for c, g in zip(coords, grid, strict=True))
        local = tuple(c % g for c, g in zip(coords, grid, strict=True))
        fd, index = self._open(shard)
        offset, nbytes = (int(v) for v in index[local])
        if offset == int(_EMPTY):
            return np.full(lay.chunk, lay.fill_value, dtype=lay.dtype)
        raw = os.pread(fd, nbytes, offset)
        if len(raw) != nbytes:
            raise StoreError(
                f"shard file {self._name(shard)} is truncated; run `cospress verify` on the store"
            )
        return self._decode(raw, shard)

    def _name(self, shard: tuple[int, ...]) -> str:
        return str(self.dir / "c" / "/".join(str(s) for s in shard))

    def _decode(self, raw: bytes, shard: tuple[int, ...]) -> np.ndarray:
        lay = self.layout
        problem = blosc_problem(raw, self.chunk_nbytes)  # before blosc allocates what its header claims
        if problem:
            raise StoreError(
                f"{self.where}: shard file {self._name(shard)} is corrupted: {problem}; run `cospress verify` on the store"
            )
        try:
            out = np.frombuffer(self.codec.decode(raw), dtype=lay.dtype)
            return out.reshape(lay.chunk)
        except (RuntimeError, ValueError) as e:
            raise StoreError(
                f"a chunk of shard file {self._name(shard)} cannot be decoded ({e}); run `cospress verify` on the store"
            ) from None

    def read(self, sel: tuple[int, ...]) -> np.ndarray:
        """``array[sel]`` for integer indices ``sel`` along the leading axes, whose inner chunks are 1
        wide (a row of ``cls``; a row or a (row, view) of ``tokens``): shape ``layout.shape[len(sel):]``."""
        lay = self.layout
        m = len(sel)
        if m > len(lay.shape) or any(lay.chunk[d] != 1 for d in range(m)):
            raise ValueError(f"selection {sel} does not address whole inner chunks of {lay.chunk}")
        for d, i in enumerate(sel):
            if not 0 <= i < lay.shape[d]:
                raise StoreError(f"index {i} is out of range for axis {d} of size {lay.shape[d]}")
        rest, inner = lay.shape[m:], lay.chunk[m:]
        counts = [-(-s // k) for s, k in zip(rest, inner, strict=True)]
        if rest == inner:
            return self.read_chunk(tuple(sel) + (0,) * len(rest)).reshape(rest)
        out = np.empty(rest, dtype=lay.dtype)
        for cc in product(*(range(c) for c in counts)):
            block = self.read_chunk(tuple(sel) + cc).reshape(inner)
            region = tuple(slice(c * k, min((c + 1) * k, s)) for c, k, s in zip(cc, inner, rest, strict=True))
            out[region] = block[tuple(slice(0, r.stop - r.start) for r in region)]
        return out

    def read_shard(self, shard: int, rows: int) -> np.ndarray:
        """The first ``rows`` rows of shard ``shard`` (along axis 0), from one read of its file."""
        lay = self.layout
        key = (shard,) + (0,) * (len(lay.shape) - 1)
        if any(s != a for s, a in zip(lay.shard[1:], lay.shape[1:], strict=True)):
            raise ValueError("read_shard needs shards that span every axis but the first")
        fd, index = self._open(key)
        size = os.fstat(fd).st_size
        blob = os.pread(fd, size, 0)
        if len(blob) != size:
            raise StoreError(f"shard file {self._name(key)} is truncated; run `cospress verify` on the store")
        rows = max(0, min(rows, lay.shard[0]))
        out = np.empty((-(-rows // lay.chunk[0]) * lay.chunk[0], *lay.shard[1:]), dtype=lay.dtype)
        for local in product(*(range(g) for g in lay.grid)):
            if local[0] * lay.chunk[0] >= rows:  # past the rows asked for: never allocated nor read
                continue
            offset, nbytes = (int(v) for v in index[local])
            sel = tuple(slice(c * k, (c + 1) * k) for c, k in zip(local, lay.chunk, strict=True))
            if offset == int(_EMPTY):
                out[sel] = lay.fill_value
            elif offset + nbytes > size:
                raise StoreError(
                    f"shard file {self._name(key)} is truncated; run `cospress verify` on the store"
                )
            else:
                out[sel] = self._decode(blob[offset : offset + nbytes], key)
        return out[:rows]


class ShardBlob:
    """One array's shard file held in memory (fetched whole, e.g. by the stream reader): its index is
    checked once, and an inner chunk costs one blosc decode. The same decoding as
    :class:`ShardFileReader`, over bytes instead of a file."""

    def __init__(self, blob: bytes, layout: ShardLayout, name: str) -> None:
        self.blob, self.layout, self.name = blob, layout, name
        want = layout.index_nbytes()
        raw = blob[-want:] if len(blob) >= want else b""
        if len(raw) != want:
            raise StoreError(f"shard file {name} is truncated; run `cospress verify` on the store")
        body, crc = raw[:-4], int(np.frombuffer(raw[-4:], "<u4")[0])
        if google_crc32c.value(body) != crc:
            raise StoreError(
                f"the index of shard file {name} is corrupted; run `cospress verify` on the store"
            )
        self.chunk_nbytes = int(np.prod(layout.chunk)) * layout.dtype.itemsize
        problem = ChunkSpec("", "blosc", self.chunk_nbytes, len(body) // 16).index_problem(raw, len(blob))
        if problem:
            raise StoreError(f"shard file {name} is corrupted: {problem}; run `cospress verify` on the store")
        self.index = np.frombuffer(body, "<u8").reshape(*layout.grid, 2)
        self.codec = layout.codec()

    @property
    def nbytes(self) -> int:
        return len(self.blob)

    def read(self, local: tuple[int, ...]) -> np.ndarray:
        """The values under leading local indices ``local`` (a row, or a (row, view)) whose inner chunk
        they fill exactly: shape ``layout.chunk[len(local):]``."""
        lay = self.layout
        coords = tuple(local) + (0,) * (len(lay.grid) - len(local))
        offset, nbytes = (int(v) for v in self.index[coords])
        shape = lay.chunk[len(local) :]
        if offset == int(_EMPTY):
            return np.full(shape, lay.fill_value, dtype=lay.dtype)
        if offset + nbytes > len(self.blob) - lay.index_nbytes():
            raise StoreError(f"shard file {self.name} is truncated; run `cospress verify` on the store")
        problem = blosc_problem(memoryview(self.blob)[offset : offset + nbytes], self.chunk_nbytes)
        if problem:
            raise StoreError(
                f"shard file {self.name} is corrupted: {problem}; run `cospress verify` on the store"
            )
        try:
            out = np.frombuffer(self.codec.decode(memoryview(self.blob)[offset : offset + nbytes]), lay.dtype)
            return out.reshape(shape)
        except (RuntimeError, ValueError) as e:
            raise StoreError(
                f"a chunk of shard file {self.name} cannot be decoded ({e}); run `cospress verify` on the store"
            ) from None


def write_shard_file(path: str | os.PathLike, data: bytes | Iterable[bytes]) -> str:
    """Write one shard file atomically: ``data`` (bytes, or parts such as :func:`shard_parts`) into
    ``.NAME.tmp`` beside it, fsynced, then renamed; returns the sha256 of what was written.

    Each part is hashed and written as it comes (both release the GIL). The temp file's name is fixed
    (one writer owns a shard): a run killed mid-write leaves at most one temp file per shard file, which
    the rerun truncates and renames; nothing is listed per shard, so its cost does not grow with the
    shards already written.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    digest = hashlib.sha256()
    try:
        for part in (data,) if isinstance(data, (bytes, bytearray, memoryview)) else data:
            digest.update(part)
            view = memoryview(part)
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return digest.hexdigest()
