"""The direct shard codec (cospress.store.shardio) against zarr-python on the same arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec

from cospress.errors import StoreError
from cospress.store.shardio import ShardFileReader, ShardLayout, encode_shard

CASES = [
    # name, shape, inner chunk, dtype
    ("tokens", (10, 3, 4, 8), (1, 1, 4, 8), "float16"),
    ("cls", (10, 3, 8), (1, 3, 8), "float16"),
    ("views", (10, 3, 5), (1, 3, 5), "float32"),
    ("labels", (10,), (4,), "int64"),
    ("valid", (10,), (4,), "bool"),
]


def _zarr_array(root: Path, name: str, shape, chunk, dtype) -> zarr.Array:
    shard = (4, *shape[1:])
    return zarr.create_array(
        store=zarr.storage.LocalStore(root),
        name=name,
        shape=shape,
        dtype=dtype,
        chunks=chunk,
        shards=shard,
        compressors=BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"),
        fill_value=0,
        config={"write_empty_chunks": True},
    )


def _data(shape, dtype, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.random(shape) < 0.5
    if dtype == "int64":
        return rng.integers(-5, 1000, shape)
    return rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("name,shape,chunk,dtype", CASES)
def test_encoded_shards_are_byte_identical_to_zarr_and_read_back(tmp_path, name, shape, chunk, dtype):
    """Shards 0-1 full, shard 2 short (rows 8-9, padded): our bytes == zarr's bytes, both ways readable."""
    data = _data(shape, dtype, 0)
    arr = _zarr_array(tmp_path / "z", name, shape, chunk, dtype)
    layout = ShardLayout.from_metadata(arr.metadata.to_dict())
    assert layout is not None and layout.grid == tuple(
        s // c for s, c in zip(layout.shard, chunk, strict=True)
    )
    ours = _zarr_array(tmp_path / "o", name, shape, chunk, dtype)
    tail = "/".join(["0"] * (len(shape) - 1))
    for shard, (start, stop) in enumerate([(0, 4), (4, 8), (8, 10)]):
        arr[start:stop] = data[start:stop]
        key = "/".join(filter(None, [name, "c", str(shard), tail]))
        blob = encode_shard(layout, data[start:stop])
        assert blob == (tmp_path / "z" / key).read_bytes()
        (tmp_path / "o" / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "o" / key).write_bytes(blob)
    np.testing.assert_array_equal(np.asarray(ours[:]), data)  # zarr reads what we wrote
    reader = ShardFileReader(tmp_path / "z" / name, layout)
    for shard, (start, stop) in enumerate([(0, 4), (4, 8), (8, 10)]):
        np.testing.assert_array_equal(reader.read_shard(shard, stop - start), data[start:stop])
    if chunk[0] == 1:
        for row in (0, 5, 9):
            np.testing.assert_array_equal(reader.read((row,)), data[row])
            if len(chunk) > 1 and chunk[1] == 1:
                np.testing.assert_array_equal(reader.read((row, 2)), data[row, 2])


def test_reader_names_a_corrupted_index_and_a_truncated_file(tmp_path):
    name, shape, chunk, dtype = CASES[0]
    arr = _zarr_array(tmp_path, name, shape, chunk, dtype)
    arr[:] = _data(shape, dtype, 1)
    layout = ShardLayout.from_metadata(arr.metadata.to_dict())
    f = tmp_path / name / "c" / "1" / "0" / "0" / "0"
    raw = bytearray(f.read_bytes())
    raw[-10] ^= 0xFF  # inside the index: its crc32c no longer matches
    f.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="index of shard file .* is corrupted"):
        ShardFileReader(tmp_path / name, layout).read((5, 0))
    f.write_bytes(bytes(raw[:20]))
    with pytest.raises(StoreError, match="truncated"):
        ShardFileReader(tmp_path / name, layout).read((5, 0))
    np.testing.assert_array_equal(  # other shards still read
        ShardFileReader(tmp_path / name, layout).read((0, 1)), np.asarray(arr[0, 1])
    )


def test_other_codecs_are_left_to_zarr(tmp_path):
    arr = zarr.create_array(
        store=zarr.storage.LocalStore(tmp_path),
        name="a",
        shape=(8, 4),
        dtype="float32",
        chunks=(1, 4),
        shards=(4, 4),
        compressors=zarr.codecs.ZstdCodec(level=1),
    )
    assert ShardLayout.from_metadata(arr.metadata.to_dict()) is None
    plain = zarr.create_array(
        store=zarr.storage.LocalStore(tmp_path), name="b", shape=(8, 4), dtype="float32", chunks=(1, 4)
    )
    assert ShardLayout.from_metadata(plain.metadata.to_dict()) is None


def test_a_shard_written_part_by_part_is_the_encoded_file_and_its_hash(tmp_path):
    """The writer streams a shard's chunks into the file (no shard-sized join): same bytes, same sha256."""
    import hashlib

    from cospress.store.shardio import shard_parts, write_shard_file

    name, shape, chunk, dtype = CASES[0]
    layout = ShardLayout.from_metadata(
        _zarr_array(tmp_path / "z", name, shape, chunk, dtype).metadata.to_dict()
    )
    data = _data(shape, dtype, 3)
    for start, stop in [(0, 4), (8, 10)]:
        blob = encode_shard(layout, data[start:stop])
        parts = list(shard_parts(layout, data[start:stop]))
        assert len(parts) == (stop - start) * shape[1] + 1  # one per inner chunk, then the index
        path = tmp_path / "out" / f"s{start}"
        assert write_shard_file(path, iter(parts)) == hashlib.sha256(blob).hexdigest()
        assert path.read_bytes() == blob
        assert write_shard_file(path, blob) == hashlib.sha256(blob).hexdigest()
        assert sorted(p.name for p in path.parent.iterdir()) == sorted(
            f"s{a}" for a in (0, 8)[: 1 + (start > 0)]
        )
