"""The stream reader (store/stream.py): the order of an epoch (deterministic, no row lost or repeated,
ranks and lanes disjoint, resumable at any step) and its rows equal to the random-access reader's."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cospress.store.reader import StoreReader  # noqa: E402
from cospress.store.stream import StreamOrder, StreamReader, gather, lane_batches, shard_order  # noqa: E402
from tests.test_distill import make_store  # noqa: E402


class _NoFetch:
    """A stand-in fetcher for order-only tests: no files (the rows are what is checked)."""

    def prefetched(self, shards, depth, extra=None):
        yield from ((int(s), {}) for s in shards)


def _epoch(order: StreamOrder, start: int = 0) -> dict[int, np.ndarray]:
    """Global step -> rows of one rank's epoch, interleaving the lanes as the loader does."""
    out = {}
    for lane in range(order.lanes):
        for j, rows, _ in lane_batches(order, lane, order.first_batch(lane, start), _NoFetch()):
            out[j * order.lanes + lane] = rows.copy()
    return dict(sorted(out.items()))


def _order(train, **kw) -> StreamOrder:
    base = dict(shard_size=16, num_shards=int(train.max()) // 16 + 1, seed=3, epoch=1, batch=5)
    return StreamOrder(train_rows=train, **{**base, **kw})


TRAIN = np.setdiff1d(np.arange(16 * 24 - 7), [3, 40, 41, 100, 200])  # a short last shard, some held out


@pytest.mark.parametrize("lanes,buffer", [(1, 1), (1, 4), (3, 2), (2, 5)])
def test_one_epoch_is_deterministic_and_has_no_row_twice(lanes, buffer):
    order = _order(TRAIN, lanes=lanes, buffer=buffer)
    steps = _epoch(order)
    assert list(steps) == list(range(len(order)))  # every step, in order
    rows = np.concatenate(list(steps.values()))
    assert len(rows) == len(np.unique(rows)) == len(order) * order.batch  # no row twice
    assert set(rows) <= set(TRAIN)
    # at most about one shard per lane is left out of an epoch
    assert len(TRAIN) - len(rows) <= lanes * (16 + order.batch)
    again = _epoch(_order(TRAIN, lanes=lanes, buffer=buffer))
    assert all(np.array_equal(steps[k], again[k]) for k in steps)
    other = _epoch(_order(TRAIN, lanes=lanes, buffer=buffer, epoch=2))
    assert any(not np.array_equal(steps[k], other[k]) for k in steps)  # reshuffled each epoch


def test_a_buffer_mixes_several_shards_in_a_batch():
    order = _order(TRAIN, buffer=4, batch=8)
    batch = _epoch(order)[1]
    assert len(set(batch // 16)) >= 3


def test_ranks_read_disjoint_shards_and_run_the_same_steps():
    orders = [_order(TRAIN, world=3, rank=r, lanes=2) for r in range(3)]
    assert len({len(o) for o in orders}) == 1
    shards = [set(np.concatenate([o.lane_shards(lane) for lane in range(2)])) for o in orders]
    assert set.union(*shards) == set(range(orders[0].num_shards))
    assert sum(len(s) for s in shards) == orders[0].num_shards  # disjoint
    rows = [np.concatenate(list(_epoch(o).values())) for o in orders]
    assert all(set(rows[r] // 16) <= shards[r] for r in range(3))
    allrows = np.concatenate(rows)
    assert len(allrows) == len(np.unique(allrows))


@pytest.mark.parametrize("start", [1, 4, 7])
def test_resume_at_any_step_gives_the_rest_of_the_epoch(start):
    order = _order(TRAIN, lanes=3, buffer=2)
    full, rest = _epoch(order), _epoch(order, start)
    assert list(rest) == list(range(start, len(order)))
    assert all(np.array_equal(full[k], rest[k]) for k in rest)


def test_shard_order_is_a_permutation_per_seed_and_epoch():
    a = shard_order(50, 0, 0)
    assert sorted(a) == list(range(50))
    assert not np.array_equal(a, shard_order(50, 0, 1)) and not np.array_equal(a, shard_order(50, 1, 0))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("stream"), n=23, k=3, shard_size=5)[0]


@pytest.mark.parametrize("prefix", ["", "file://"])
def test_streamed_rows_equal_the_random_access_reader(store, prefix):
    reader = StoreReader(store)
    stream = StreamReader(prefix + store, ("cls", "views", "tokens"))
    train = np.arange(reader.num_rows)
    order = StreamOrder(
        train_rows=train, shard_size=5, num_shards=reader.num_shards, seed=0, epoch=0, batch=4
    )
    seen = 0
    for _, rows, held in lane_batches(order, 0, 0, stream, depth=1):
        views = np.stack([np.array([2, 0]) if r % 2 else np.array([1, 2]) for r in rows])
        got = gather(held, 5, rows, views)
        want = reader.read_rows(rows, views=views)
        for name in ("cls", "views", "tokens"):
            np.testing.assert_array_equal(got[name], want[name])
        seen += len(rows)
    assert seen == len(order) * 4
    assert stream.gets == 3 * reader.num_shards  # one GET per array shard in the epoch


def test_key_lookup_by_binary_search_matches_a_dict_and_names_a_missing_key():
    from cospress.distill.data import key_index
    from cospress.errors import StoreError

    rng = np.random.default_rng(0)
    source = [f"img/{i:05d}" if i % 7 else f"é/{i}" for i in rng.permutation(5000)]  # unicode too
    store = [source[i] for i in rng.permutation(5000)[:3000]] + ["img/a", "img/a0"]
    rows = np.arange(3000)
    got = key_index(store, source, rows, "spec")
    pos = {k: i for i, k in enumerate(source)}
    assert np.array_equal(got[:3000], [pos[k] for k in store[:3000]]) and (got[3000:] == -1).all()
    with pytest.raises(StoreError, match="1 store key.*first: 'img/a'"):
        key_index(store, source, np.arange(3001), "spec")
    assert (key_index(["x"], [], np.zeros(0, np.int64), "s") == -1).all()


def test_the_wds_member_index_is_arrays_built_once_and_cached(tmp_path, monkeypatch):
    from cospress.data import wds_index
    from cospress.data.sources import open_source
    from tests.test_sources import _encode, _rgb, _write_shard

    monkeypatch.setenv("COSPRESS_CACHE_DIR", str(tmp_path / "cache"))
    imgs = [_encode(_rgb(i), "PNG") for i in range(3)]
    tar = tmp_path / "a.tar"
    _write_shard(tar, [("x0.png", imgs[0]), ("x0.cls", b"4"), ("x1.png", imgs[1]), ("x2.txt", b"t")])
    src = open_source(f"wds:{tar}")
    assert isinstance(src._offset, np.ndarray) and src._offset.dtype == np.int64
    entry = wds_index.entry_path(str(tar))
    assert entry.is_file()
    built = entry.read_bytes()
    again = open_source(f"wds:{tar}")  # from the cache
    assert again.keys() == ["x0", "x1", "x2"] and again.labels() == [4, -1, -1]
    assert again.read_bytes(1) == imgs[1] and entry.read_bytes() == built
    entry.write_bytes(b"damaged")  # a damaged entry is rebuilt, never used
    assert open_source(f"wds:{tar}").read_bytes(0) == imgs[0] and entry.read_bytes() == built
    _write_shard(tar, [("y.png", imgs[2])])  # a changed tar: a new entry
    assert open_source(f"wds:{tar}").keys() == ["y"]


def test_the_index_of_a_tar_at_a_url_is_cached_by_its_version(tmp_path, monkeypatch):
    """A tar read over HTTP is indexed once (a full GET), then found by one HEAD per tar while its
    ETag holds; a changed tar (new ETag) is indexed again; a server without versions: every time."""
    from cospress.data.sources import open_source
    from tests.faultsrv import FaultServer
    from tests.test_sources import _encode, _rgb, _write_shard

    monkeypatch.setenv("COSPRESS_CACHE_DIR", str(tmp_path / "cache"))
    imgs = [_encode(_rgb(i), "PNG") for i in range(3)]
    www = tmp_path / "www"
    www.mkdir()

    def gets(srv: FaultServer) -> int:
        n = sum(1 for method, *_ in srv.log if method == "GET")
        srv.log.clear()
        return n

    for etag in (True, False):
        for s in range(2):
            _write_shard(www / f"t{s}.tar", [(f"s{s}_{i}.png", imgs[i]) for i in range(3)])
        srv = FaultServer(www, etag=etag)
        try:
            spec = f"wds:{srv.url}/t{{0..1}}.tar"
            first = open_source(spec)
            assert gets(srv) >= 2 and first.keys() == [f"s{s}_{i}" for s in range(2) for i in range(3)]
            again = open_source(spec)
            assert again.keys() == first.keys() and again.read_bytes(4) == imgs[1]
            assert gets(srv) == (1 if etag else 2 + 1)  # cached: only the image read; else both tars again
            _write_shard(www / "t1.tar", [("new.png", imgs[2])])  # a changed tar: a new ETag
            assert open_source(spec).keys()[-1] == "new" and gets(srv) >= 1
        finally:
            srv.close()
