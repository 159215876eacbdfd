"""Stage 1 end to end through the real CLI: correctness, resume after SIGKILL, 2 ranks, bad inputs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from cospress.extract.writer_proc import processes_supported
from cospress.store import StoreReader
from cospress.store.records import NEW, read_record
from tests.helpers import cli_env, make_image_folder, make_tiny_teacher_weights, run_cli, torchrun_cli
from tests.store_helpers import to_legacy

ARRAYS = ("cls", "tokens", "views", "labels", "valid", "keys")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"), classes=3, per_class=8)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return make_tiny_teacher_weights(tmp_path_factory.mktemp("w") / "test_vit.safetensors", img_size=32)


def _args(images: Path, weights: Path, out: Path, *extra: str) -> list[str]:
    return [
        "extract-teacher",
        "--data",
        f"folder:{images}",
        "--teacher",
        "test_vit",
        "--weights",
        str(weights),
        "--image-size",
        "32",
        "--views",
        "3",
        "--shard-size",
        "5",
        "--batch-size",
        "6",
        "--workers",
        "0",
        "--precision",
        "fp32",
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


def _arrays(store: Path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(store), mode="r")
    return {name: g[name][...] for name in ARRAYS}


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    for name in ARRAYS:
        assert a[name].shape == b[name].shape, name
        assert np.array_equal(a[name], b[name]), f"array {name} differs"


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory, images, weights) -> Path:
    out = tmp_path_factory.mktemp("ref") / "store"
    run_cli(*_args(images, weights, out))
    return out


def test_store_complete_and_verifies(reference_store):
    manifest = read_record(reference_store, NEW.manifest)
    assert manifest["skipped"] == []
    g = zarr.open_group(str(reference_store), mode="r")
    assert g["cls"].shape == (24, 3, 64)
    assert g["tokens"].shape == (24, 3, 4, 64)
    assert g["valid"][...].all()
    assert sorted(set(g["labels"][...].tolist())) == [0, 1, 2]
    proc = run_cli("verify", str(reference_store))
    assert "ok" in proc.stderr + proc.stdout


def test_the_config_is_stored_once_in_its_record(reference_store, images):
    config = read_record(reference_store, NEW.config)
    assert config["views"] == 3 and config["data"] == f"folder:{images}"
    assert set(read_record(reference_store, NEW.manifest)["extra"]) == {"timings"}  # no second copy


def test_stored_cls_equals_teacher_on_replayed_views(reference_store, images, weights):
    """The stored features are the teacher's output on the views replayed from the stored params."""
    from cospress.data.sources import open_source
    from cospress.data.views import replay_view
    from cospress.models.teachers import build_teacher

    g = zarr.open_group(str(reference_store), mode="r")
    teacher = build_teacher("test_vit", weights=str(weights), image_size=32)
    source = open_source(f"folder:{images}")
    keys = list(g["keys"][...])
    assert sorted(keys) == source.keys()  # every image once, in the shuffled row order
    for row in (0, 7, 23):
        image = source.load(source.keys().index(keys[row])).image
        x = torch.stack([replay_view(image, p, 32) for p in g["views"][row]])
        with torch.inference_mode():
            feats = teacher(x)
        np.testing.assert_allclose(g["cls"][row].astype(np.float32), feats.cls.numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(
            g["tokens"][row].astype(np.float32), feats.tokens.numpy(), rtol=2e-3, atol=2e-3
        )


def test_rerun_is_a_noop_and_mismatch_is_refused(reference_store, images, weights, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(reference_store, out)
    before = _arrays(out)
    run_cli(*_args(images, weights, out))
    _assert_same(before, _arrays(out))
    proc = run_cli(*_args(images, weights, out, "--seed", "1"), check=False)
    assert proc.returncode == 2
    assert "seed" in proc.stderr and "--overwrite" in proc.stderr
    assert "Traceback" not in proc.stderr
    run_cli(*_args(images, weights, out, "--seed", "1", "--overwrite"))
    assert read_record(out, NEW.manifest)["seed"] == 1


def test_resume_with_another_decode_is_refused_and_old_stores_still_append(
    reference_store, images, weights, tmp_path
):
    """The identity records the resolved decode path: a resume with another one would mix decoders in
    one store and is refused; a store written before it was recorded still resumes, verifies and appends."""
    out = tmp_path / "store"
    shutil.copytree(reference_store, out)
    assert read_record(out, NEW.identity)["decode"] == "cpu"
    (out / NEW.manifest).unlink()  # an unfinished store: its last shard not committed
    (out / NEW.commit(4)).unlink()
    proc = run_cli(*_args(images, weights, out, "--decode", "device"), check=False)
    assert proc.returncode == 2 and "decode path (store: cpu, this run: device:cpu)" in proc.stderr
    run_cli(*_args(images, weights, out, "--decode", "cpu"))
    _assert_same(_arrays(reference_store), _arrays(out))
    # as a schema 1.2 store: records as root files, no decode in the identity, no metadata fields
    to_legacy(
        out,
        "1.2",
        lambda doc: [doc.pop(key, None) for key in ("decode", "metadata_sha256", "arrays", "token_codec")],
    )
    assert run_cli("verify", str(out)).returncode == 0
    data = tmp_path / "data"
    shutil.copytree(images, data)
    (data / "class_3").mkdir()
    shutil.copy(next((data / "class_0").glob("*.png")), data / "class_3" / "new.png")
    args = _args(data, weights, out, "--append", "--decode", "cpu")
    run_cli(*args)
    manifest = StoreReader(out).manifest
    assert (
        manifest["decode"] == "cpu" and manifest["keys_sha256"] and "class_3/new.png" in _arrays(out)["keys"]
    )
    assert run_cli("verify", str(out)).returncode == 0


def _commits(store: Path) -> int:
    return len(list((store / NEW.commits).glob("shard-*/zarr.json")))


PROCESSES = ("--writers", "2", "--writer-kind", "process")


@pytest.mark.parametrize("writers", [(), PROCESSES], ids=["thread", "processes"])
def test_sigkill_then_rerun_is_bitwise_identical(reference_store, images, weights, tmp_path, writers):
    """SIGKILL the run at several moments (before any commit, mid-run); rerunning completes it bit for bit
    (with writer processes too: they die with the run)."""
    if writers and not processes_supported():
        pytest.skip("writer processes need Linux")
    out = tmp_path / "store"
    cmd = [sys.executable, "-m", "cospress", *_args(images, weights, out, *writers)]
    kills = 0
    for target in (0, 1, 3):  # kill once the store holds this many committed shards
        proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            ready = (out / NEW.identity).exists() if target == 0 else _commits(out) >= target
            if ready:
                break
            time.sleep(0.01)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        assert not (out / NEW.manifest).exists() or proc.returncode == 0
    assert kills >= 2, "the runs finished before they could be killed"
    assert _commits(out) < 5
    run_cli(*_args(images, weights, out, *writers))
    _assert_same(_arrays(reference_store), _arrays(out))
    assert run_cli("verify", str(out)).returncode == 0


def test_writer_processes_write_the_store_one_thread_writes(reference_store, images, weights, tmp_path):
    if not processes_supported():
        pytest.skip("writer processes need Linux")
    out = tmp_path / "store"
    proc = run_cli(*_args(images, weights, out, *PROCESSES))
    assert "shard writers: 2 processes" in proc.stderr
    _assert_same(_arrays(reference_store), _arrays(out))
    assert run_cli("verify", str(out)).returncode == 0


def test_two_ranks_equal_one_process(reference_store, images, weights, tmp_path):
    out = tmp_path / "store"
    cmd = torchrun_cli(*_args(images, weights, out))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same(_arrays(reference_store), _arrays(out))
    manifest = read_record(out, NEW.manifest)
    assert len(manifest["shards"]) == 5


def test_bad_inputs_are_skipped_and_recorded(images, weights, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(images, data)
    bad = data / "class_0"
    (bad / "zero.png").write_bytes(b"")
    good = (bad / "img_000.png").read_bytes()
    (bad / "truncated.png").write_bytes(good[: len(good) // 2])
    (bad / "text.jpg").write_text("this is not an image\n")
    Image.new("L", (1200, 1000)).save(bad / "bomb.png")  # over the --max-pixels limit below
    out = tmp_path / "store"
    proc = run_cli(*_args(data, weights, out, "--max-pixels", "500000"))
    manifest = read_record(out, NEW.manifest)
    reasons = {s["key"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {
        "class_0/zero.png",
        "class_0/truncated.png",
        "class_0/text.jpg",
        "class_0/bomb.png",
    }
    assert reasons["class_0/zero.png"].startswith("empty")
    assert reasons["class_0/truncated.png"].startswith("truncated")
    assert reasons["class_0/text.jpg"].startswith("not an image")
    assert reasons["class_0/bomb.png"].startswith("too many pixels")
    assert "4" in proc.stdout  # the summary prints the skipped count
    g = zarr.open_group(str(out), mode="r")
    keys = list(g["keys"][...])
    valid = g["valid"][...]
    for key in reasons:
        assert valid[keys.index(key)] == 0
    assert valid.sum() == 24
    assert run_cli("verify", str(out)).returncode == 0


def test_verify_names_a_corrupted_shard(reference_store, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(reference_store, out)
    shard_file = next(p for p in sorted((out / "cls").rglob("*")) if p.is_file() and p.name != "zarr.json")
    data = bytearray(shard_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard_file.write_bytes(bytes(data))
    proc = run_cli("verify", str(out), check=False)
    assert proc.returncode == 1
    assert "corrupted" in proc.stderr and "cls" in proc.stderr


def test_bad_source_is_one_line_error(weights, tmp_path):
    proc = run_cli(*_args(tmp_path / "missing", weights, tmp_path / "s"), check=False)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", ["extract-teacher", "inspect", "verify"])
def test_help(command):
    proc = run_cli(command, "--help")
    assert "Usage" in proc.stdout


def test_device_decode_matches_worker_decode(reference_store, images, weights, tmp_path):
    """--decode device (batched decode + replay on the compute device; the GPU path run on the CPU)."""
    out = tmp_path / "store"
    run_cli(*_args(images, weights, out, "--decode", "device"))
    a, b = _arrays(reference_store), _arrays(out)
    for name in ("views", "labels", "valid", "keys"):
        assert np.array_equal(a[name], b[name]), name
    # views may differ by a grey level between decoders: features agree closely, not bitwise
    cos = (a["cls"].astype(np.float32) * b["cls"].astype(np.float32)).sum(-1) / (
        np.linalg.norm(a["cls"].astype(np.float32), axis=-1)
        * np.linalg.norm(b["cls"].astype(np.float32), axis=-1)
    )
    assert cos.min() > 0.99
