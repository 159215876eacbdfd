"""Class names in the store (schema 2.1, #24 item 11): extract records them, `append` and `merge` map
labels by name (a new class gets a new number, a name keeps one number), stores without names still
read and merge as before, and labels that cannot be matched by name are refused in one line."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from cospress.store import SCHEMA_VERSION, StoreLayout, StoreReader, StoreWriter  # noqa: E402
from cospress.store import manifest as mf  # noqa: E402
from cospress.store.records import NEW  # noqa: E402
from tests import helpers  # noqa: E402
from tests.helpers import error_line, run_cli  # noqa: E402
from tests.test_sharing import D, P, T, V, _identity, _rows, _write  # noqa: E402


def _store(path: Path, prefix: str, labels: list[int], names: list[str] | None) -> StoreReader:
    """A complete store written with the real StoreWriter whose source names its classes ``names``."""
    n = len(labels)
    data = _rows(prefix, n, seed=len(prefix) + n)
    data["labels"] = np.asarray(labels, np.int64)
    ident = _identity(prefix, n)
    if names is not None:
        ident["source"]["class_names"] = names
        ident["class_names"] = names
    w = StoreWriter.open(path, ident, StoreLayout(n, 3, V, D, T, P, True))
    for s in range(w.num_shards):
        _write(w, s, data, *w.shard_rows(s))
    w.finalize()
    return StoreReader(path)


def test_extract_records_class_names_and_append_of_a_new_class_maps_by_name(tmp_path):
    """A new class folder that sorts first (label 0 in the grown folder) used to take label 0 of the
    store: label 0 then meant two classes."""
    weights = helpers.make_tiny_teacher_weights(tmp_path / "w.safetensors", img_size=32)
    images = helpers.make_image_folder(tmp_path / "img", classes=2, per_class=3, seed=0)
    store = helpers.extract_tiny_store(images, weights, tmp_path / "store")
    m = StoreReader(store).manifest
    assert m["schema_version"] == SCHEMA_VERSION == "2.1" and m["class_names"] == ["class_0", "class_1"]
    extra = helpers.make_image_folder(tmp_path / "extra", classes=2, per_class=2, seed=5)
    shutil.copytree(extra / "class_0", images / "aaa_new")  # a new class, first in sorted order
    for p in (extra / "class_1").iterdir():
        shutil.copy(p, images / "class_1" / f"more-{p.name}")  # new images of a known class
    helpers.extract_tiny_store(images, weights, store, append=True)
    r = StoreReader(store)
    assert r.manifest["class_names"] == ["class_0", "class_1", "aaa_new"]
    got = dict(zip(r.keys(), r.labels().tolist(), strict=True))
    want = {"class_0": 0, "class_1": 1, "aaa_new": 2}
    real = {k: v for k, v in got.items() if k}
    assert len(real) == 10 and all(v == want[k.split("/")[0]] for k, v in real.items()), real
    assert r.verify() == []
    assert json.loads(run_cli("inspect", str(store), "--json").stdout)["counts"]["rows"] >= 10


def test_merge_maps_labels_by_name(tmp_path):
    """merge kept each input's numbers: label 0 was cat in one input and dog in the other."""
    _store(tmp_path / "a", "teamA", [0, 1, 1, -1, 0], ["cat", "dog"])
    _store(tmp_path / "b", "teamB", [0, 1, 2, 0], ["dog", "cat", "eel"])
    run_cli("merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c"), "--no-progress")
    r = StoreReader(tmp_path / "c")
    assert r.manifest["class_names"] == ["cat", "dog", "eel"]
    assert r.labels().tolist() == [0, 1, 1, -1, 0] + [1, 0, 2, 1]
    assert r.verify() == [] and r.manifest["schema_version"] == SCHEMA_VERSION
    # merged again with a store of the same names in another order: one number per name
    _store(tmp_path / "d", "teamD", [0, 1], ["eel", "cat"])
    run_cli("merge", str(tmp_path / "c"), str(tmp_path / "d"), "--out", str(tmp_path / "e"), "--no-progress")
    assert StoreReader(tmp_path / "e").labels().tolist()[-2:] == [2, 0]


def test_stores_without_class_names_read_merge_as_before_or_refuse_in_one_line(tmp_path):
    old = _store(tmp_path / "old", "teamO", [0, 1, 0], None)  # a store of a source without names
    assert mf.class_names(old.manifest) is None and old.verify() == []
    _store(tmp_path / "old2", "teamP", [1, 0], None)
    run_cli(
        "merge", str(tmp_path / "old"), str(tmp_path / "old2"), "--out", str(tmp_path / "m"), "--no-progress"
    )
    r = StoreReader(tmp_path / "m")
    assert r.labels().tolist() == [0, 1, 0, 1, 0] and "class_names" not in r.manifest  # numbers kept
    _store(tmp_path / "named", "teamN", [0, 1], ["cat", "dog"])
    proc = run_cli(
        "merge", str(tmp_path / "named"), str(tmp_path / "old"), "--out", str(tmp_path / "x"), check=False
    )
    line = error_line(proc)
    assert "cannot match the labels of" in line and "no class names" in line, line
    assert not (tmp_path / "x" / NEW.manifest).exists()
    # unlabelled rows need no names: a store without labels merges with a named one
    _store(tmp_path / "unlabelled", "teamU", [-1, -1], None)
    run_cli("merge", str(tmp_path / "named"), str(tmp_path / "unlabelled"), "--out", str(tmp_path / "y"), "--no-progress")  # fmt: skip
    assert StoreReader(tmp_path / "y").manifest["class_names"] == ["cat", "dog"]


def test_a_2_0_store_without_the_field_reads_and_its_source_names_count(tmp_path):
    """A store written before 2.1 (names only in its source) still reads, verifies and merges by name."""
    _store(tmp_path / "a", "teamA", [0, 1], ["cat", "dog"])
    for key in (NEW.identity, NEW.manifest):  # as 2.0 wrote them: no top-level class_names
        path = tmp_path / "a" / key
        doc = json.loads(path.read_text())
        del doc["attributes"]["class_names"]
        doc["attributes"]["schema_version"] = "2.0"
        path.write_text(json.dumps(doc))
    m = StoreReader(tmp_path / "a").manifest
    m_hashes = m.get("metadata_sha256", {})
    if NEW.identity in m_hashes:  # the identity's hash is in the manifest: rewrite it as 2.0 did
        import hashlib

        doc = json.loads((tmp_path / "a" / NEW.manifest).read_text())
        sha = hashlib.sha256((tmp_path / "a" / NEW.identity).read_bytes()).hexdigest()
        doc["attributes"]["metadata_sha256"][NEW.identity] = sha
        (tmp_path / "a" / NEW.manifest).write_text(json.dumps(doc))
    r = StoreReader(tmp_path / "a")
    assert r.verify() == [] and mf.class_names(r.manifest) == ["cat", "dog"]
    _store(tmp_path / "b", "teamB", [0], ["dog"])
    run_cli("merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c"), "--no-progress")
    assert StoreReader(tmp_path / "c").labels().tolist() == [0, 1, 1]
