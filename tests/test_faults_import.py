"""`import-wds --overwrite` checks every sample before the old store is touched (issue 24, item 3)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from cospress.errors import StoreError
from cospress.store.reader import StoreReader
from cospress.store.wds_io import SIDECAR, export_wds, import_wds
from tests.test_sharing import assert_rows_equal, make_store, mf_sha


def _break_last_sample(w: Path, tar_name: str) -> None:
    """Rewrite ``tar_name`` with its last sample's views of the wrong shape (sha256 updated)."""
    tar = w / tar_name
    with tarfile.open(tar) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    last_json = max(i for i, (m, _) in enumerate(members) if m.name.endswith(".json"))
    meta = json.loads(members[last_json][1])
    meta["views"] = [[0.0]]
    members[last_json] = (members[last_json][0], json.dumps(meta).encode())
    with tarfile.open(tar, "w") as t:
        for m, data in members:
            m.size = len(data)
            t.addfile(m, io.BytesIO(data))
    side = json.loads((w / SIDECAR).read_text())
    for s in side["shards"]:
        if s["name"] == tar_name:
            s["sha256"] = mf_sha(tar)
    (w / SIDECAR).write_text(json.dumps(side))


def test_import_overwrite_with_a_bad_sample_keeps_the_old_store(tmp_path):
    old = make_store(tmp_path / "old", "team", 8, 2, seed=1)
    make_store(tmp_path / "new", "team", 8, 2, seed=2)
    good, bad = tmp_path / "w-old", tmp_path / "w-new"
    export_wds(str(tmp_path / "old"), good, samples_per_shard=4)
    export_wds(str(tmp_path / "new"), bad, samples_per_shard=4)
    _break_last_sample(bad, "shard-000001.tar")  # found after 3 of the 4 store shards are written
    out = tmp_path / "stores" / "t"
    import_wds(good, out)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    with pytest.raises(StoreError, match="has views"):
        import_wds(bad, out, overwrite=True)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == files
    assert [p.name for p in out.parent.iterdir()] == ["t"]  # nothing left beside it
    r = StoreReader(out)
    assert r.verify() == []
    assert_rows_equal(r.read_rows(np.arange(8)), old)
    # a good overwrite replaces it
    fixed = tmp_path / "w-new2"
    export_wds(str(tmp_path / "new"), fixed, samples_per_shard=4)
    import_wds(fixed, out, overwrite=True)
    assert [p.name for p in out.parent.iterdir()] == ["t"]
    assert StoreReader(out).read_rows([0])["keys"] == ["team/img.0000.jpg"]
    assert not np.array_equal(StoreReader(out).read_rows([0])["cls"], old["cls"][:1])


def test_import_overwrite_refuses_a_folder_that_is_no_store(tmp_path):
    make_store(tmp_path / "s", "team", 4, 2, seed=1)
    export_wds(str(tmp_path / "s"), tmp_path / "w", samples_per_shard=4)
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not a cospress store"):
        import_wds(tmp_path / "w", home, overwrite=True)
    assert (home / "notes.txt").read_text() == "keep me"
