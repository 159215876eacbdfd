"""A store written by a fixed extract command is the golden one: byte for byte, features by value.

The golden hashes (tests/data/golden_store.json) were first written by this test's command at commit
4724e22, before the code was reorganised into one package per stage, and rewritten for the schema 2.0
layout: a refactor that changes a single byte of an array's metadata, the recorded views, the keys,
labels or the chunk layout fails here. The teacher's float16 outputs (cls, tokens) are compared by
value with golden_store_features.npz: their last bits depend on the CPU's matmul kernels (the hashes
of the same command differed between an AVX-512/AMX Xeon and an AVX-512 EPYC under the same torch).
Regenerated for issue 26 (tokens stored with blosc lz4 instead of zstd: tokens/zarr.json changed).
The command asks for source row order (the order of every store before --row-order): a source-order
store stays byte-identical; tests/test_row_order.py shows the shuffled order holds the same rows.
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
import zarr
from PIL import Image

from cospress.store.records import NEW, read_record
from tests.helpers import make_tiny_teacher_weights, run_cli

GOLDEN = Path(__file__).parent / "data" / "golden_store.json"
# Files whose bytes hold a time or a local path: compared through the manifest's checksums instead.
VOLATILE = (NEW.manifest, NEW.identity, NEW.config)
GOLDEN_FEATURES = GOLDEN.with_name("golden_store_features.npz")
FEATURES = (
    "cls/",
    "tokens/",
)  # float outputs of the teacher: compared by value (CPU kernels round differently)


def _is_feature_chunk(rel: str) -> bool:
    return rel.startswith(FEATURES) and not rel.endswith("zarr.json")


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
        if p.is_file() and rel not in VOLATILE and not rel.startswith(f"{NEW.commits}/"):
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
        "--color-jitter", "0.5", "--grayscale", "0.2", "--blur", "0.3", "--row-order", "source",
        "--out", str(store), "--no-progress",
    )  # fmt: skip
    manifest = read_record(store, NEW.manifest)
    hashes = _file_hashes(store)
    got = {
        "torch": torch.__version__,
        "files": {k: v for k, v in hashes.items() if not _is_feature_chunk(k)},
        "feature_chunks": sorted(k for k in hashes if _is_feature_chunk(k)),
        "shapes": manifest["shapes"],
        "dtypes": manifest["dtypes"],
    }
    group = zarr.open_group(str(store), mode="r")
    features = {name: np.asarray(group[name][...]) for name in ("cls", "tokens")}
    if os.environ.get("COSPRESS_WRITE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        np.savez_compressed(GOLDEN_FEATURES, **features)
        pytest.skip(f"wrote {GOLDEN} and {GOLDEN_FEATURES}")
    want = json.loads(GOLDEN.read_text())
    assert got["shapes"] == want["shapes"] and got["dtypes"] == want["dtypes"]
    assert sorted(got["files"]) == sorted(want["files"]), "the store's file list changed"
    assert got["feature_chunks"] == want["feature_chunks"], "the feature arrays' chunk files changed"
    for name, digest in want["files"].items():
        assert got["files"][name] == digest, f"{name} differs from the golden store"
    with np.load(GOLDEN_FEATURES) as golden:
        for name, values in features.items():
            assert values.dtype == golden[name].dtype, name
            # fp32 teacher outputs differ in their last bits between CPU kernels (AVX2 / AVX-512 / AMX):
            # after float16 rounding that is at most a unit or two in the last place
            np.testing.assert_allclose(
                values.astype(np.float32), golden[name].astype(np.float32), rtol=4e-3, atol=4e-3
            )
