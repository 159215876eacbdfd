"""`cospress distill` over the stream reader: the reader chosen (and logged) by what the store is, a
reproducible run, and a run killed with SIGKILL mid-epoch then resumed bitwise equal to an
uninterrupted one, from file:// and from an S3 bucket (moto on 127.0.0.1), with one and two lanes."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import logging  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from cospress import checkpoint as ckpt  # noqa: E402
from cospress.config import to_dict  # noqa: E402
from cospress.distill import run_distill  # noqa: E402
from cospress.distill.streaming import choose_reader  # noqa: E402
from cospress.errors import ConfigError  # noqa: E402
from cospress.store.reader import StoreReader  # noqa: E402
from tests.test_distill import make_store, tiny_cfg  # noqa: E402
from tests.test_distill_resume import _resume_and_compare, kill_after_two_steps  # noqa: E402
from tests.test_s3_store import s3  # noqa: E402, F401  (the moto server fixture)

KW = dict(epochs=2, save_every=1, val_fraction=0.2, stream_buffer=2)


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """(store path, image spec): 40 rows in 8 shards of 5."""
    return make_store(tmp_path_factory.mktemp("stream-store"), n=40, shard_size=5)


def _run(cfg):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # float sums depend on the thread count: match the subprocesses
    try:
        return run_distill(cfg)
    finally:
        torch.set_num_threads(threads)


def _weights(out: Path) -> dict:
    return ckpt.load_checkpoint(out, "last")[0]


def test_auto_streams_a_url_and_reads_a_small_local_store_at_random(local):
    store = StoreReader(local[0])

    def mode(reader: str, url: str, cache_dir=None) -> str:
        return choose_reader(SimpleNamespace(reader=reader, store=url, cache_dir=cache_dir), store)[0]

    assert mode("auto", local[0]) == "random"
    assert mode("auto", "file://" + local[0]) == "stream"
    assert mode("auto", "s3://b/x") == "stream"
    assert mode("auto", "s3://b/x", cache_dir="/tmp/c") == "random"  # read through the cache
    assert mode("stream", local[0]) == "stream"
    assert mode("random", "s3://b/x") == "random"


def test_a_streamed_run_is_reproducible_and_says_which_reader(local, tmp_path, caplog):
    url, spec = local
    with caplog.at_level(logging.INFO, logger="cospress"):
        a = _run(tiny_cfg(url, tmp_path / "a", data=spec, reader="stream", **KW))
    assert any("store reader: stream (--reader stream)" in r.getMessage() for r in caplog.records)
    b = _run(tiny_cfg("file://" + url, tmp_path / "b", data=spec, **KW))  # auto: a URL streams
    assert a["steps"] == b["steps"] >= 8
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cospress"):
        _run(tiny_cfg(url, tmp_path / "c", data=spec, epochs=1))
    assert any("store reader: random access (auto: a local store" in r.getMessage() for r in caplog.records)


def test_stream_refuses_more_lanes_than_shards(local, tmp_path):
    url, spec = local
    with pytest.raises(ConfigError, match="--reader stream: 8 shards"):
        _run(tiny_cfg(url, tmp_path / "x", data=spec, reader="stream", workers=8, batch_size=24, **KW))


def _kill_and_resume(url: str, spec: str, tmp_path: Path, workers: int) -> None:
    ref = _run(tiny_cfg(url, tmp_path / "ref", data=spec, workers=workers, **KW))
    cfg = to_dict(tiny_cfg(url, tmp_path / "killed", data=spec, workers=workers, **KW))
    per_epoch = ref["steps"] // 2
    assert 2 <= kill_after_two_steps(cfg) < per_epoch  # killed mid-epoch (the first one)
    _resume_and_compare(cfg, tmp_path / "ref", ref["steps"])


@pytest.mark.parametrize("workers", [2])
def test_sigkill_mid_epoch_then_resume_from_file_url_is_bitwise(local, tmp_path, workers):
    url, spec = local
    _kill_and_resume("file://" + url, spec, tmp_path, workers)


def test_sigkill_mid_epoch_then_resume_from_s3_is_bitwise(local, s3, tmp_path):  # noqa: F811
    from cospress.store.publish import publish_store

    url, spec = local
    publish_store(url, "s3://bucket/stream/x")
    _kill_and_resume("s3://bucket/stream/x", spec, tmp_path, workers=2)


@pytest.fixture(scope="module")
def wds_store(tmp_path_factory):
    """(store, spec): 30 images in 3 tars of 10, extracted with the tiny test_vit teacher (shards of 5)."""
    from tests import helpers
    from tests.test_sources import _encode, _rgb, _write_shard

    tmp = tmp_path_factory.mktemp("wds")
    for t in range(3):
        members = []
        for i in range(t * 10, t * 10 + 10):
            members += [
                (f"s{i:03d}.png", _encode(_rgb(i, 40, 40), "PNG")),
                (f"s{i:03d}.cls", str(i % 2).encode()),
            ]
        _write_shard(tmp / f"part-{t}.tar", members)
    spec = f"wds:{tmp}/part-{{0..2}}.tar"
    weights = helpers.make_tiny_teacher_weights(tmp / "t.safetensors", img_size=32)
    from cospress.extract import ExtractConfig, run_extract

    run_extract(ExtractConfig(data=spec, teacher="test_vit", weights=str(weights), image_size=32, views=4,
                              shard_size=5, batch_size=16, workers=0, precision="fp32", device="cpu",
                              out=str(tmp / "store")))  # fmt: skip
    return str(tmp / "store"), spec


def test_wds_images_stream_as_one_byte_range_per_tar_and_store_shard(wds_store):
    from cospress.data.sources import open_source
    from cospress.distill.data import key_index
    from cospress.distill.streaming import ImageRanges
    from cospress.store.stream import StreamOrder, StreamReader, lane_batches

    url, spec = wds_store
    store, source = StoreReader(url), open_source(spec)
    train = np.arange(store.num_rows)
    index = key_index(store.keys(), source.keys(), train, spec)
    order = StreamOrder(
        train_rows=train, shard_size=5, num_shards=store.num_shards, seed=0, epoch=0, batch=4, buffer=2
    )
    ranges = ImageRanges(source, index, order)
    seen = 0
    for _, rows, held in lane_batches(order, 0, 0, StreamReader(url, ("cls",)), 2, ranges):
        ranges.hold(held)
        for r in rows:  # every image of a batch is held, and is the source's own bytes
            assert int(index[r]) in ranges.images
            assert ranges.source.read_bytes(int(index[r])) == source.read_bytes(int(index[r]))
        seen += len(rows)
    assert seen == len(order) * 4
    # a store shard of 5 rows lies in one tar: one range each
    assert all(
        len({int(t) for t in source.image_members(index[s * 5 : s * 5 + 5])[0]}) == 1 for s in range(6)
    )


def test_a_wds_run_streams_targets_and_images(wds_store, tmp_path, caplog):
    url, spec = wds_store
    with caplog.at_level(logging.INFO, logger="cospress"):
        a = _run(tiny_cfg("file://" + url, tmp_path / "a", data=spec, workers=1, **{**KW, "epochs": 1}))
    assert any("images one byte range per tar" in r.getMessage() for r in caplog.records)
    b = _run(tiny_cfg("file://" + url, tmp_path / "b", data=spec, workers=0, **{**KW, "epochs": 1}))
    assert a["steps"] == b["steps"] >= 2
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_stream_batches_never_open_the_random_access_reader_nor_reload_columns(local, tmp_path):
    from cospress import runtime
    from cospress.distill.run import open_train_data
    from cospress.distill.streaming import stream_loader

    url, spec = local
    cfg = tiny_cfg("file://" + url, tmp_path / "x", data=spec, **KW)
    data = open_train_data(cfg, 1)
    ctx = runtime.DistContext(0, 1, 0, torch.device("cpu"))
    order, loader = stream_loader(data, cfg, ctx, 1, 0, "cpu")
    assert data.stream is not None and data.steps_per_epoch == len(order)
    rng = torch.get_rng_state()
    steps = [int(b["step"]) for b in loader]
    assert torch.equal(rng, torch.get_rng_state())  # the loader never draws the global RNG
    assert steps == list(range(len(order)))
    assert data.lazy._reader is None  # no per-row reader, no key / label / valid columns in the loader
    assert 0 < data.stream.reader.gets <= 3 * order.num_shards  # each shard file at most once


def test_resuming_a_streamed_epoch_with_other_workers_is_refused(local):
    from cospress.distill.streaming import check_stream_resume

    url, spec = local
    cfg = tiny_cfg("file://" + url, "unused", data=spec, workers=2, **KW)
    data = SimpleNamespace(stream=object())
    state = {"position": 3, "config": {"reader": "auto", "workers": 1, "stream_buffer": 2}}
    with pytest.raises(ConfigError, match="--workers 1 -> 2"):
        check_stream_resume(data, cfg, state)
    check_stream_resume(data, cfg, {**state, "position": 0})  # at an epoch boundary: any settings
    check_stream_resume(data, cfg, {**state, "config": {**state["config"], "workers": 2}})
    check_stream_resume(SimpleNamespace(stream=None), cfg, state)  # random access: workers do not matter


def test_compressor_first_over_a_streamed_store_reads_whole_shard_files(local, tmp_path, monkeypatch):
    """--compressor-first fits h from the stream (each shard file once per fit epoch), never row by
    row through the random-access reader (from a bucket: ~8 requests per image per epoch)."""
    import cospress.distill.data as distill_data
    from cospress.store.stream import StreamReader

    def no_row_reads(*args, **kwargs):
        raise AssertionError("the compressor fit read rows at random access")

    monkeypatch.setattr(distill_data, "read_targets", no_row_reads)
    gets = []
    fetch = StreamReader.fetch
    monkeypatch.setattr(
        StreamReader, "fetch", lambda self, shard, extra=None: gets.append(shard) or fetch(self, shard, extra)
    )
    url, spec = local
    cfg = tiny_cfg(
        "file://" + url, tmp_path / "h", data=spec, compressor_first=True, compressor_epochs=2, **KW
    )
    out = _run(cfg)
    rows = [
        r for r in map(__import__("json").loads, (tmp_path / "h" / "metrics.jsonl").read_text().splitlines())
    ]
    fit = [r for r in rows if r.get("phase") == "compressor"]
    assert len(fit) >= 2 and all(np.isfinite(r["loss/total"]) for r in fit) and out["steps"] >= 8
    assert len(gets) <= 8 * (2 + 2)  # 8 shards: at most once per fit epoch and per training epoch
