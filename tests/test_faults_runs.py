"""Runs that stop or change under a user (issue 24, items 13, 15, 16): an unlabelled knn-eval test set,
a distill run killed before its first checkpoint, a resume over a store that grew."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from cospress import checkpoint as ckpt  # noqa: E402
from cospress.distill import run_distill  # noqa: E402
from cospress.errors import ConfigError  # noqa: E402
from tests.helpers import make_image_folder, make_tiny_teacher_weights, run_cli  # noqa: E402
from tests.test_distill import make_store, tiny_cfg  # noqa: E402


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_knn_eval_with_an_unlabelled_test_set_says_so_in_one_line(tmp_path):
    """Item 13: a test set with no label at all ends in one line, not an IndexError."""
    train = make_image_folder(tmp_path / "train", classes=2, per_class=3)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.fromarray(np.full((36, 36, 3), 40 * i, np.uint8)).save(flat / f"a{i}.png")
    weights = make_tiny_teacher_weights(tmp_path / "t.safetensors", img_size=32)
    proc = run_cli(
        "knn-eval", "--model", f"teacher:test_vit@32={weights}", "--train", f"folder:{train}",
        "--test", f"folder:{flat}", "--k", "2", "--workers", "0", "--fidelity-teacher", "none",
        "--out", str(tmp_path / "out"), check=False,
    )  # fmt: skip
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert "Traceback" not in text and "IndexError" not in text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is unlabelled" in errors[0], text


def test_a_run_killed_before_its_first_checkpoint_restarts_its_metrics(tmp_path):
    """Item 15: with --save-every 0 a kill in epoch 0 leaves metrics rows and no checkpoint; the rerun
    (with --resume) starts over and writes each step once (58 rows for 38 steps before the fix)."""
    url, _ = make_store(tmp_path, n=20, shard_size=7)
    out = tmp_path / "run"
    first = run_distill(tiny_cfg(url, out, epochs=1))
    steps = first["steps"]
    rows = _metrics(out)
    for f in out.iterdir():  # what a kill before the first checkpoint leaves: the metrics rows only
        if f.name != "metrics.jsonl":
            f.unlink() if f.is_file() else shutil.rmtree(f)
    assert not ckpt.exists(out, "last")
    run_distill(tiny_cfg(url, out, epochs=1, resume=True))
    again = _metrics(out)
    assert [r["step"] for r in again if r["phase"] == "train"] == list(range(1, steps + 1))
    assert len(again) == len(rows)


def test_resume_over_a_store_that_grew_is_refused(tmp_path):
    """Item 16: --resume compares the store (rows, keys, identity), not only the config."""
    small, _ = make_store(tmp_path / "a", n=12, shard_size=6)
    out = tmp_path / "run"
    run_distill(tiny_cfg(small, out, epochs=1))
    header = json.loads((out / "run.json").read_text())["store"]
    assert header["rows"] == 12 and len(header["identity_sha256"]) == 64
    # the same path now holds a grown store (18 rows, the same teacher and settings)
    shutil.move(small, tmp_path / "kept")
    make_store(tmp_path / "b", n=18, shard_size=6)
    shutil.move(str(tmp_path / "b" / "store"), small)
    with pytest.raises(ConfigError, match=r"--resume: the store .* is not the one .*rows 12 -> 18"):
        run_distill(tiny_cfg(small, out, epochs=2, resume=True))
    # the same store resumes as before
    shutil.rmtree(small)
    shutil.move(tmp_path / "kept", small)
    assert run_distill(tiny_cfg(small, out, epochs=2, resume=True))["steps"] > 0
