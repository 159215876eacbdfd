"""A store written by a fixed extract command is byte-identical to the golden one.

The golden hashes (tests/data/golden_store.json) were written by this test's command at commit
4724e22, before the code was reorganised into one package per stage: a refactor that changes a
single byte of a shard file, an array's metadata or the recorded views fails here.
Regenerate only for an intended format change: COSPRESS_WRITE_GOLDEN=1 pytest tests/test_golden_store.py
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cospress.store import manifest as mf
from cospress.store.records import read_record
from tests.helpers import make_tiny_teacher_weights, run_cli

GOLDEN = Path(__file__).parent / "data" / "golden_store.json"
# Files whose bytes hold a time or a local path: compared through the manifest's checksums instead.
VOLATILE = (mf.MANIFEST_FILE, mf.IDENTITY_FILE, mf.CONFIG_FILE)
FEATURES = ("cls/", "tokens/")  # float outputs of the teacher: exact only under the same torch build


def _images(root: Path) -> Path:
    rng = np.random.default_rng(7)
    for c in range(3):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(5):
            w, h = (int(v) for v in rng.integers(20, 48, size=2))
            Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(d / f"img_{i}.png")
    return root


def _file_hashes(store: Path) -> dict[str, str]:
    out = {}
    for p in sorted(store.rglob("*")):
        rel = p.relative_to(store).as_posix()
        if p.is_file() and rel not in VOLATILE and not rel.startswith(f"{mf.COMMITS_DIR}/"):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_store_bytes_match_the_golden_store(tmp_path: Path) -> None:
    images = _images(tmp_path / "images")
    weights = make_tiny_teacher_weights(tmp_path / "w.safetensors", img_size=32)
    store = tmp_path / "store"
    run_cli(
        "extract-teacher", "--data", f"folder:{images}", "--teacher", "test_vit", "--weights", str(weights),
        "--image-size", "32", "--views", "2", "--center-view", "--shard-size", "4", "--batch-size", "6",
        "--workers", "0", "--precision", "fp32", "--device", "cpu", "--decode", "cpu",
        "--color-jitter", "0.5", "--grayscale", "0.2", "--blur", "0.3", "--out", str(store), "--no-progress",
    )  # fmt: skip
    manifest = read_record(store, mf.MANIFEST_FILE)
    got = {
        "torch": torch.__version__,
        "files": _file_hashes(store),
        "shard_sha256": [s["sha256"] for s in manifest["shards"]],
        "shapes": manifest["shapes"],
        "dtypes": manifest["dtypes"],
    }
    if os.environ.get("COSPRESS_WRITE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"wrote {GOLDEN}")
    want = json.loads(GOLDEN.read_text())
    assert got["shapes"] == want["shapes"] and got["dtypes"] == want["dtypes"]
    same_torch = got["torch"] == want["torch"]
    assert sorted(got["files"]) == sorted(want["files"]), "the store's file list changed"
    for name, digest in want["files"].items():
        if same_torch or not name.startswith(FEATURES):
            assert got["files"][name] == digest, f"{name} differs from the golden store"
    if same_torch:
        assert got["shard_sha256"] == want["shard_sha256"]
