"""What a reader checks before it trusts the bytes of a store it did not write (docs/store-format.md,
"What a reader checks").

A store from another team is untrusted input. Every path a manifest names stays inside the store;
a shard file the manifest lists must exist (a missing one is an error, never fill values); declared
sizes are bounded before anything is allocated: an inner chunk decodes to at most `MAX_CHUNK_BYTES`,
a shard file's rows to at most `MAX_RATIO` times its size on disk, a shard index never points past
its file, and a codec header must claim exactly the chunk the array's metadata describes.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import ByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype

from cospress.errors import StoreError

# Decoded bytes of one inner chunk: a token chunk of the largest teachers (ViT-g/14 at 518 px, fp16)
# is ~4 MiB; anything past this is a crafted store, refused before a buffer is allocated.
MAX_CHUNK_BYTES = 1 << 28
# Decoded bytes of a shard file's rows per byte on disk: blosc zstd packs all-zero rows ~18,000x.
MAX_RATIO = 1 << 15
SLACK = 1 << 20
_EMPTY = 2**64 - 1
_ITEMSIZE = {"float16": 2, "float32": 4, "int64": 8, "uint8": 1, "int8": 1, "str": 8}
_VERIFY = "run `cospress verify` on the store; re-upload or re-extract it"


def safe_key(key: Any) -> bool:
    """Whether ``key`` is a relative "/"-separated path that stays inside the store."""
    if not isinstance(key, str) or not key or key.startswith("/") or "\\" in key or "\0" in key:
        return False
    return not any(part in ("", ".", "..") or ":" in part for part in key.split("/"))


def local_file(root: str, key: str, where: str) -> str:
    """The path of file ``key`` of the local store at ``root``: StoreError unless it is a regular file
    inside the store (a symlink out of it, a device or a fifo is refused; a missing file is
    FileNotFoundError)."""
    if not safe_key(key):
        raise StoreError(f"{where}: {key[:80]!r} is not a path inside the store; {_VERIFY}")
    path = os.path.join(root, key)
    real = os.path.realpath(path)
    if os.path.commonpath([real, os.path.realpath(root)]) != os.path.realpath(root):
        raise StoreError(f"{where}: {key} links outside the store; a store's files are its own: {_VERIFY}")
    st = os.stat(real)  # FileNotFoundError for a missing file or a dangling link
    if not stat.S_ISREG(st.st_mode):
        raise StoreError(f"{where}: {key} is not a regular file; {_VERIFY}")
    return real


def check_scale(scale: np.ndarray, where: str) -> None:
    """StoreError unless every token scale is finite and >= 0 (NaN, inf or a negative scale would
    decode to NaN, inf or sign-flipped tokens)."""
    s = np.asarray(scale, dtype=np.float32)
    bad = ~np.isfinite(s) | (s < 0)
    if bad.any():
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        raise StoreError(
            f"{where}: token_scale holds {s[at]} at {list(at)} (a scale must be finite and >= 0); "
            "the store is corrupted or was written by a broken tool: re-extract it"
        )


def row_bytes(manifest: dict, name: str) -> int:
    """Decoded bytes of one row of array ``name`` (a key counts as its 8-byte reference)."""
    shape = manifest["shapes"][name]
    return int(np.prod(shape[1:], dtype=object)) * _ITEMSIZE.get(manifest["dtypes"][name], 8)


def check_declared(manifest: dict) -> None:
    """ValueError unless every array's inner chunk and shard index fit the bounds (no I/O)."""
    from cospress.store.layout import array_chunks

    size = int(manifest["shard_size"])
    for name, shape in manifest["shapes"].items():
        chunk, shard = array_chunks(name, shape, size)
        nbytes = int(np.prod(chunk, dtype=object)) * _ITEMSIZE.get(manifest["dtypes"].get(name), 8)
        grid = int(np.prod([s // c for s, c in zip(shard, chunk, strict=True)], dtype=object))
        if nbytes > MAX_CHUNK_BYTES or grid * 16 > MAX_CHUNK_BYTES:
            raise ValueError(
                f"{name!r} of shape {str(shape)[:60]} has inner chunks of {nbytes:,} bytes "
                f"({grid:,} per shard), over the {MAX_CHUNK_BYTES >> 20} MiB a reader accepts"
            )


def check_shard_file(manifest: dict, name: str, entry: dict, size: int, key: str, where: str) -> None:
    """StoreError unless the shard file ``key`` of ``size`` bytes can hold the rows the manifest says
    it holds: its index fits in it and the rows decode to at most `MAX_RATIO` x its size."""
    from cospress.store.layout import array_chunks

    chunk, shard = array_chunks(name, manifest["shapes"][name], int(manifest["shard_size"]))
    index = int(np.prod([s // c for s, c in zip(shard, chunk, strict=True)], dtype=object)) * 16 + 4
    rows = int(entry["rows"][1]) - int(entry["rows"][0])
    declared = rows * row_bytes(manifest, name)
    if size < index:
        raise StoreError(
            f"{where}: shard file {key} is truncated ({size} bytes, its index alone is {index}); {_VERIFY}"
        )
    if declared > size * MAX_RATIO + SLACK:
        raise StoreError(
            f"{where}: shard file {key} ({size:,} bytes) would decode to {declared:,} bytes for its "
            f"{rows} rows, more than a real store packs; the store's declared shapes are wrong: {_VERIFY}"
        )


def blosc_problem(raw: bytes | memoryview, want: int, stored: int | None = None) -> str | None:
    """Why ``raw`` (a chunk of ``stored`` bytes, default all of ``raw``; its header is enough) is not
    a blosc1 chunk of ``want`` decoded bytes, or None. Nothing is decoded."""
    stored = len(raw) if stored is None else stored
    if len(raw) < 16 or stored < 16:
        return f"a chunk of {stored} bytes is shorter than its blosc header"
    nbytes, _, cbytes = struct.unpack_from("<III", raw, 4)
    if nbytes != want:
        return f"a blosc header claims {nbytes:,} decoded bytes, the chunk holds {want:,}"
    if cbytes != stored:
        return f"a blosc header claims {cbytes:,} stored bytes, the index gives {stored:,}"
    return None


def zstd_size(raw: bytes | memoryview) -> int | None:
    """The content size a zstd frame header declares, or None when it has none or is not zstd."""
    if len(raw) < 6 or bytes(raw[:4]) != b"\x28\xb5\x2f\xfd":
        return None
    fhd = raw[4]
    single, did, fcs_flag = (fhd >> 5) & 1, fhd & 3, fhd >> 6
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[did]
    width = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if not width or len(raw) < pos + width:
        return None
    value = int.from_bytes(bytes(raw[pos : pos + width]), "little")
    return value + 256 if width == 2 else value


@dataclass(frozen=True)
class ChunkSpec:
    """How one array's inner chunks are encoded: ``codec`` blosc or zstd (the keys), ``nbytes`` the
    decoded bytes of one chunk (blosc) and ``entries`` the inner chunks per shard."""

    name: str
    codec: str
    nbytes: int
    entries: int

    @classmethod
    def from_metadata(cls, name: str, meta: dict) -> ChunkSpec | None:
        from cospress.store.shardio import ShardLayout

        lay = ShardLayout.from_metadata(meta)
        if lay is not None:
            nbytes = int(np.prod(lay.chunk, dtype=object)) * lay.dtype.itemsize
            return cls(name, "blosc", nbytes, int(np.prod(lay.grid, dtype=object)))
        try:
            conf = meta["codecs"][0]["configuration"]
            names = [c["name"] for c in conf["codecs"]]
            shard = meta["chunk_grid"]["configuration"]["chunk_shape"]
            grid = int(
                np.prod([s // c for s, c in zip(shard, conf["chunk_shape"], strict=True)], dtype=object)
            )
        except (KeyError, TypeError, IndexError, ZeroDivisionError):
            return None
        return cls(name, "zstd", MAX_CHUNK_BYTES, grid) if names == ["vlen-utf8", "zstd"] else None

    def chunk_problem(self, raw: bytes | memoryview, stored: int | None = None) -> str | None:
        """Why the chunk ``raw`` (or its first bytes, of a chunk of ``stored`` bytes) cannot be
        decoded within the bounds, or None."""
        if self.codec == "blosc":
            return blosc_problem(raw, self.nbytes, stored)
        size = zstd_size(raw)
        if size is None or size > MAX_CHUNK_BYTES:
            return f"a zstd frame declares {size} decoded bytes (at most {MAX_CHUNK_BYTES:,} with a size)"
        return None

    def index_problem(self, raw: bytes | memoryview, file_size: int | None) -> str | None:
        """Why the shard index ``raw`` (with its crc32c) cannot be trusted, or None."""
        if len(raw) != self.entries * 16 + 4:
            return f"the shard index is {len(raw)} bytes, not {self.entries * 16 + 4}"
        idx = np.frombuffer(bytes(raw[:-4]), "<u8").reshape(-1, 2)
        used = idx[idx[:, 0] != np.uint64(_EMPTY)]
        most = 2 * self.nbytes + 4096  # blosc's worst case is the chunk stored plain, plus headers
        if used.size and int(used[:, 1].max()) > most:
            return f"the shard index gives a chunk of {int(used[:, 1].max()):,} bytes (at most {most:,})"
        end = (file_size - len(raw)) if file_size is not None else 1 << 62
        if used.size and (int(used[:, 0].max()) > end or int((used[:, 0] + used[:, 1]).max()) > end):
            return "the shard index points past the end of the file"
        return None


def _chunk_key(key: str) -> tuple[str, str] | None:
    """(array, shard part) of a chunk key ``<array>/c/<...>``, else None (metadata keys)."""
    head, sep, tail = key.partition("/c/")
    return (head, tail) if sep else None


class GuardedStore(zarr.storage.WrapperStore):
    """A read-only zarr store that refuses what a hostile store could do to a reader: a key outside
    the store or a symlink out of it (local), a missing chunk file of a known array (instead of fill
    values), a shard index or codec header that claims more than the array's metadata allows.

    ``specs`` maps array names to their `ChunkSpec` (filled once the arrays' metadata is checked);
    ``root`` is the local store's folder (None for a remote one).
    """

    def __init__(self, store: zarr.abc.store.Store, where: str, root: str | None = None,
                 specs: dict[str, ChunkSpec] | None = None) -> None:  # fmt: skip
        super().__init__(store)
        self.where, self.root = where, root
        self.specs: dict[str, ChunkSpec] = specs if specs is not None else {}

    def _with_store(self, store: zarr.abc.store.Store) -> GuardedStore:
        return type(self)(store, self.where, self.root, self.specs)

    def _fail(self, key: str, problem: str) -> StoreError:
        return StoreError(f"{self.where}: shard file {key} is corrupted: {problem}; {_VERIFY}")

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        size = None
        if self.root is not None:
            try:
                size = os.path.getsize(local_file(self.root, key, self.where))
            except FileNotFoundError:
                size = None
        elif not safe_key(key):
            raise StoreError(f"{self.where}: {key[:80]!r} is not a path inside the store; {_VERIFY}")
        out = await self._store.get(key, prototype, byte_range)
        part = _chunk_key(key)
        spec = self.specs.get(part[0]) if part else None
        if spec is None:
            return out
        if out is None:
            raise StoreError(
                f"{self.where}: shard file {key} is missing (deleted, or not uploaded yet); "
                "finish the upload or re-extract the store (cospress verify lists every missing file)"
            )
        raw = out.to_bytes()
        problem = None
        if isinstance(byte_range, SuffixByteRequest):
            problem = spec.index_problem(raw, size)
        elif isinstance(byte_range, RangeByteRequest):
            problem = spec.chunk_problem(raw)
        elif byte_range is None:
            problem = self._whole_problem(spec, raw)
        if problem:
            raise self._fail(key, problem)
        return out

    @staticmethod
    def _whole_problem(spec: ChunkSpec, raw: bytes) -> str | None:
        n = spec.entries * 16 + 4
        if len(raw) < n:
            return f"{len(raw)} bytes, less than its index"
        problem = spec.index_problem(raw[-n:], len(raw))
        if problem:
            return problem
        idx = np.frombuffer(raw[-n:-4], "<u8").reshape(-1, 2)
        for offset, nbytes in idx[idx[:, 0] != np.uint64(_EMPTY)].tolist():
            problem = spec.chunk_problem(memoryview(raw)[offset : offset + nbytes])
            if problem:
                return problem
        return None

    async def get_partial_values(self, prototype: BufferPrototype, key_ranges: Any) -> list[Buffer | None]:
        return [await self.get(key, prototype, rng) for key, rng in key_ranges]


def chunk_spec(name: str, meta: dict, where: str) -> ChunkSpec:
    """The `ChunkSpec` of array ``name`` from its ``zarr.json``: StoreError when its fill value is not
    the store's, its codecs are not ones a cospress store uses, or its inner chunks or shard index
    exceed the bounds."""
    from cospress.store.layout import FILL_VALUES

    got, want = meta.get("fill_value"), FILL_VALUES.get(name)
    try:
        same = got == want or float(got) == float(want)
    except (TypeError, ValueError):
        same = False
    if want is not None and not same:  # a crafted fill value would show wherever a chunk is absent
        raise StoreError(f"{where}: {name}/zarr.json has fill_value {str(got)[:40]}, not {want!r}; {_VERIFY}")
    spec = ChunkSpec.from_metadata(name, meta)
    if spec is None:
        raise StoreError(f"{where}: {name}/zarr.json has codecs a cospress store never uses; {_VERIFY}")
    if spec.nbytes > MAX_CHUNK_BYTES or spec.entries * 16 > MAX_CHUNK_BYTES:
        raise StoreError(
            f"{where}: {name}/zarr.json declares inner chunks of {spec.nbytes:,} bytes ({spec.entries:,} "
            f"per shard), over the {MAX_CHUNK_BYTES >> 20} MiB a reader accepts; {_VERIFY}"
        )
    return spec


def check_local_sizes(manifest: dict, root: str, where: str) -> None:
    """Every shard file the manifest lists exists in the local store at ``root``, inside it, and is
    large enough for its declared rows (`check_shard_file`); one ``stat`` per file."""
    from cospress.store.manifest import shard_file_key

    for entry in manifest["shards"]:
        for name, shape in manifest["shapes"].items():
            key = shard_file_key(name, int(entry["shard"]), len(shape))
            try:
                size = os.path.getsize(local_file(root, key, where))
            except FileNotFoundError:
                raise StoreError(
                    f"{where}: shard file {key} is missing (deleted, or not copied yet); "
                    "re-copy or re-extract the store (cospress verify lists every missing file)"
                ) from None
            check_shard_file(manifest, name, entry, size, key, where)


def file_problem(
    read_at: Callable[[int, int], bytes], size: int, spec: ChunkSpec, headers: bool = True
) -> str | None:
    """Why a shard file of ``size`` bytes (read by ``read_at(offset, n)``) cannot be read within the
    bounds: its index (crc32c, entries inside the file) and, with ``headers``, every chunk's codec
    header (18 bytes each, nothing decoded); None when it can."""
    import google_crc32c

    n = spec.entries * 16 + 4
    if size < n:
        return f"{size} bytes, less than its index ({n})"
    raw = read_at(size - n, n)
    if google_crc32c.value(raw[:-4]) != struct.unpack("<I", raw[-4:])[0]:
        return "its index fails its crc32c"
    problem = spec.index_problem(raw, size)
    if problem or not headers:
        return problem
    idx = np.frombuffer(raw[:-4], "<u8").reshape(-1, 2)
    for offset, nbytes in idx[idx[:, 0] != np.uint64(_EMPTY)].tolist():
        problem = spec.chunk_problem(read_at(offset, min(nbytes, 18)), nbytes)
        if problem:
            return problem
    return None
