"""View extensions (issue 27): ``extract-teacher --add-views N --to STORE`` grows a store's views
without rewriting it; base + extension read (and train) bitwise as a K+N store of the same seed."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cospress.distill import run_distill  # noqa: E402
from cospress.errors import CospressError  # noqa: E402
from cospress.extract import ExtractConfig, run_extract  # noqa: E402
from cospress.store.reader import StoreReader  # noqa: E402
from tests.helpers import error_line, make_tiny_teacher_weights, run_cli  # noqa: E402
from tests.test_distill import make_images, tiny_cfg  # noqa: E402


def extract(images: Path, weights: Path, **kw) -> dict:
    base = dict(
        data=f"folder:{images}", teacher="test_vit", weights=str(weights), image_size=32, views=2, seed=5,
        shard_size=5, batch_size=16, workers=0, precision="fp32", device="cpu",
    )  # fmt: skip
    base.update(kw)
    return run_extract(ExtractConfig(**base))


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """(images, weights, K=2 store + a 2-view extension, the K=4 store of the same seed, base files before)."""
    tmp = tmp_path_factory.mktemp("ext")
    make_images(tmp / "images", n=12)
    weights = make_tiny_teacher_weights(tmp / "teacher.safetensors")
    extract(tmp / "images", weights, views=4, out=str(tmp / "k4"))
    extract(tmp / "images", weights, views=2, out=str(tmp / "k2"))
    before = tree(tmp / "k2")
    extract(tmp / "images", weights, add_views=2, to=str(tmp / "k2"))
    return tmp / "images", weights, tmp / "k2", tmp / "k4", before


def test_extension_targets_equal_a_k4_store_bitwise(stores):
    images, _, k2, k4, before = stores
    after = tree(k2)
    assert all(after[name] == data for name, data in before.items())  # nothing of the store rewritten
    assert any(name.startswith("extensions/views-0002-0004/") for name in after)
    grown, full = StoreReader(k2), StoreReader(k4)
    assert grown.base_views == 2 and grown.stored_views == full.stored_views == 4
    assert grown.layout.stored_views == 4 and [e.first_view for e in grown.extensions] == [2]
    rows = np.arange(grown.num_rows)
    a, b = grown.read_rows(rows), full.read_rows(rows)
    for name in ("cls", "tokens", "views", "labels", "valid"):
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
    assert a["keys"] == b["keys"]
    sel = np.random.default_rng(0).integers(0, 4, (len(rows), 3))  # any view of any row, in any order
    a, b = grown.read_rows(rows[::-1], views=sel), full.read_rows(rows[::-1], views=sel)
    assert np.array_equal(a["tokens"], b["tokens"]) and np.array_equal(a["cls"], b["cls"])


def test_distill_over_an_extended_store_gives_the_k4_weights_bitwise(stores, tmp_path):
    from cospress import checkpoint as ckpt

    images, _, k2, k4, _ = stores
    weights = []
    for name, store in (("grown", k2), ("full", k4)):
        cfg = tiny_cfg(str(store), tmp_path / name, data=f"folder:{images}", epochs=1, batch_size=12,
                       views_per_image=3, val_fraction=0.0, device="cpu", seed=1)  # fmt: skip
        run_distill(cfg)
        weights.append(ckpt.load_checkpoint(tmp_path / name, "last")[0])
    assert weights[0].keys() == weights[1].keys()
    assert all(weights[0][k].equal(weights[1][k]) for k in weights[0])


def test_verify_inspect_and_publish_understand_extensions(stores, tmp_path):
    _, _, k2, _, _ = stores
    out = run_cli("inspect", str(k2), "--json").stdout
    doc = json.loads(out)
    assert doc["stored_views"] == 4 and doc["extensions"][0]["path"] == "extensions/views-0002-0004"
    assert run_cli("verify", str(k2)).returncode == 0
    run_cli("publish", str(k2), str(tmp_path / "copy"))
    copy = StoreReader(tmp_path / "copy")
    assert copy.stored_views == 4 and copy.verify() == []
    # a damaged extension shard is found by verify on the store
    shard = next((tmp_path / "copy" / "extensions").rglob("cls/c/0/0/0"))
    shard.write_bytes(shard.read_bytes()[:-3] + b"xyz")
    bad = StoreReader(tmp_path / "copy").verify()
    assert bad and bad[0]["file"].startswith("extensions/views-0002-0004/")


@pytest.mark.parametrize(
    ("change", "what"),
    [({"seed": 6}, "seed"), ({"scale_min": 0.2}, "view policy"), ({"limit": 10}, "key set")],
)
def test_an_extension_of_another_run_is_refused_in_one_line(stores, tmp_path, change, what):
    images, weights, _, k4, _ = stores
    import shutil

    store = tmp_path / "store"
    shutil.copytree(k4, store)
    before = tree(store)
    with pytest.raises(CospressError, match=what) as e:
        extract(images, weights, add_views=1, to=str(store), **change)
    assert "\n" not in str(e.value)
    assert tree(store) == before
    assert StoreReader(store).stored_views == 4


def test_cli_refuses_another_teacher(stores, tmp_path):
    images, _, k2, _, _ = stores
    other = make_tiny_teacher_weights(tmp_path / "other.safetensors", seed=1)
    proc = run_cli(
        "extract-teacher", "--data", f"folder:{images}", "--teacher", "test_vit", "--weights", str(other),
        "--image-size", "32", "--views", "2", "--seed", "5", "--workers", "0", "--precision", "fp32",
        "--device", "cpu", "--add-views", "1", "--to", str(k2), "--no-progress", check=False,
    )  # fmt: skip
    assert "teacher" in error_line(proc)


def test_export_wds_of_an_extended_store_imports_as_the_k4_store(stores, tmp_path):
    from cospress.store.wds_io import export_wds, import_wds

    _, _, k2, k4, _ = stores
    sidecar = export_wds(k2, tmp_path / "wds", samples_per_shard=5)
    assert sidecar["identity"]["k"] == 4 and sidecar["identity"]["num_views"] == 4
    import_wds(tmp_path / "wds", tmp_path / "imported")
    a, b = StoreReader(tmp_path / "imported"), StoreReader(k4)
    rows = np.arange(a.num_rows)
    x, y = a.read_rows(rows), b.read_rows(rows)
    assert all(np.array_equal(x[n], y[n]) for n in ("cls", "tokens", "views"))


def test_a_streamed_run_over_an_extended_store_gives_the_k4_weights_bitwise(stores, tmp_path):
    """The stream reader fetches shard s of the store and of each extension, and takes every view from
    its part: the same targets, so the same weights, as the K=4 store streamed."""
    from cospress import checkpoint as ckpt

    images, _, k2, k4, _ = stores
    weights = []
    for name, store in (("grown", k2), ("full", k4)):
        cfg = tiny_cfg("file://" + str(store), tmp_path / name, data=f"folder:{images}", epochs=1, reader="stream",
                       batch_size=12, views_per_image=3, val_fraction=0.0, device="cpu", seed=1)  # fmt: skip
        assert run_distill(cfg)["steps"] >= 2
        weights.append(ckpt.load_checkpoint(tmp_path / name, "last")[0])
    assert all(weights[0][k].equal(weights[1][k]) for k in weights[0])


def test_a_centre_view_store_grows_as_a_k4_centre_view_store(stores, tmp_path):
    images, weights, _, _, _ = stores
    extract(images, weights, views=4, center_view=True, out=str(tmp_path / "k4c"))
    extract(images, weights, views=2, center_view=True, out=str(tmp_path / "k2c"))
    extract(images, weights, add_views=1, to=str(tmp_path / "k2c"), center_view=True)
    extract(images, weights, add_views=1, to=str(tmp_path / "k2c"), center_view=True)  # two extensions
    a, b = StoreReader(tmp_path / "k2c"), StoreReader(tmp_path / "k4c")
    assert [e.first_view for e in a.extensions] == [2, 3] and a.stored_views == b.stored_views == 5
    rows = np.arange(a.num_rows)
    x, y = a.read_rows(rows), b.read_rows(rows)
    assert all(np.array_equal(x[n], y[n]) for n in ("cls", "tokens", "views"))  # the centre view last
