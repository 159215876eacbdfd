"""Stage 1's row order (`cospress.store.row_order`): a folder source is stored in a seeded shuffled
order, so every shard holds a mix of classes (a streamed epoch reads a few shards at a time); the
rows are the same rows as in source order, only moved; a store made before row orders existed is
resumed and extended in its own order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

import cospress
from cospress.errors import CospressError
from cospress.store.records import NEW, read_record
from cospress.store.row_order import resolve_row_order, shuffled_rows
from tests.helpers import make_image_folder, make_tiny_teacher_weights

ARRAYS = ("cls", "tokens", "views", "labels", "valid")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("order")
    images = make_image_folder(tmp / "images", classes=3, per_class=8, seed=3)
    weights = make_tiny_teacher_weights(tmp / "t.safetensors", img_size=32)
    settings = dict(data=f"folder:{images}", teacher="test_vit", weights=str(weights), image_size=32, views=2,
                    shard_size=6, batch_size=12, workers=0, precision="fp32", seed=0)  # fmt: skip
    return {"tmp": tmp, "settings": settings}


def _extract(setup: dict, name: str, **extra) -> Path:
    out = setup["tmp"] / name
    cospress.extract_teacher(**{**setup["settings"], **extra}, out=str(out))
    return out


def _rows_by_key(store: Path) -> tuple[list[str], dict[str, dict[str, np.ndarray]]]:
    g = zarr.open_group(str(store), mode="r")
    keys = [str(k) for k in g["keys"][...]]
    arrays = {name: g[name][...] for name in ARRAYS}
    return keys, {k: {name: arrays[name][i] for name in ARRAYS} for i, k in enumerate(keys)}


def _identity(store: Path) -> dict:
    return read_record(store, NEW.identity)


def test_a_folder_store_is_shuffled_and_holds_the_same_rows_as_source_order(setup: dict) -> None:
    shuffled = _extract(setup, "shuffled")  # --row-order auto: shuffled for a folder
    source = _extract(setup, "source", row_order="source")
    keys_s, rows_s = _rows_by_key(shuffled)
    keys_o, rows_o = _rows_by_key(source)
    assert keys_o == sorted(keys_o) and keys_s != keys_o and sorted(keys_s) == keys_o
    for key in keys_o:  # every row bitwise the same, only moved (views are keyed by the image's key)
        for name in ARRAYS:
            assert np.array_equal(rows_s[key][name], rows_o[key][name]), (key, name)
    assert _identity(shuffled)["row_order"] == "shuffled" and "row_order" not in _identity(source)
    labels = zarr.open_group(str(shuffled), mode="r")["labels"][...]
    per_shard = [len(set(labels[s : s + 6].tolist())) for s in range(0, len(labels), 6)]
    source_labels = zarr.open_group(str(source), mode="r")["labels"][...]
    assert [len(set(source_labels[s : s + 6].tolist())) for s in range(0, 24, 6)] == [1, 2, 2, 1]
    assert min(per_shard) >= 2 and np.mean(per_shard) > 2  # a mix of the 3 classes in every shard


def test_the_order_depends_on_the_seed_and_keys_only() -> None:
    keys = [f"class{i % 3}/img{i:03d}" for i in range(50)]
    order = shuffled_rows(keys, seed=0)
    assert sorted(order.tolist()) == list(range(50)) and order.tolist() != list(range(50))
    reversed_listing = shuffled_rows(keys[::-1], seed=0)
    assert [keys[::-1][i] for i in reversed_listing] == [keys[i] for i in order]  # listing order irrelevant
    assert shuffled_rows(keys, seed=1).tolist() != order.tolist()
    assert resolve_row_order("auto", "wds") == "source" and resolve_row_order("auto", "folder") == "shuffled"


def test_a_source_order_store_is_resumed_and_extended_in_its_own_order(setup: dict) -> None:
    source = _extract(setup, "old", row_order="source")  # as every store made before row orders
    before = _rows_by_key(source)[0]
    _extract(setup, "old")  # --row-order auto on an existing store: its own order, nothing redone
    assert _rows_by_key(source)[0] == before and "row_order" not in _identity(source)
    with pytest.raises(CospressError, match="row order"):  # an explicit other order is refused
        _extract(setup, "old", row_order="shuffled")
    cospress.extract_teacher(**setup["settings"], add_views=1, to=str(source))
    ext = sorted((source / "extensions").glob("views-*"))
    assert len(ext) == 1 and _rows_by_key(ext[0])[0] == before  # the extension's rows in the store's order


def test_streaming_a_class_sorted_store_warns_once_in_plain_words() -> None:
    from cospress.distill.streaming import unmixed_shards

    sorted_labels = np.repeat(np.arange(10), 1000)  # a class folder in source order: 1 class per shard
    msg = unmixed_shards(sorted_labels, 1000, buffer=4, row_order="source")
    assert msg is not None and "1.0 of its 10 classes" in msg and "--row-order shuffled" in msg
    assert unmixed_shards(sorted_labels, 1000, buffer=4, row_order="shuffled") is None
    mixed = np.random.default_rng(0).permutation(sorted_labels)
    assert unmixed_shards(mixed, 1000, buffer=4, row_order="source") is None  # mixed anyway: no warning
    assert unmixed_shards(sorted_labels, 1000, buffer=8, row_order="source") is None  # the buffer mixes 8
    assert unmixed_shards(np.full(3000, -1), 1000, buffer=1, row_order="source") is None  # no labels
