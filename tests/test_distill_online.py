"""Online distillation (``cospress distill --teacher``, no store): the same targets as a K=1 store on the
same view params, an end-to-end CLI run, and bitwise-equal weights after SIGKILL + --resume."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from cospress.config import to_dict  # noqa: E402
from cospress.data.sources import open_source  # noqa: E402
from cospress.distill import DistillConfig, run_distill  # noqa: E402
from cospress.distill.data import BatchPlan, DistillBatches, _Lazy, read_targets  # noqa: E402
from cospress.distill.online import load_online_teacher  # noqa: E402
from cospress.distill.run import prepare  # noqa: E402
from cospress.errors import ConfigError  # noqa: E402
from cospress.store.reader import StoreReader  # noqa: E402
from tests.helpers import error_line, make_tiny_teacher_weights, run_cli  # noqa: E402
from tests.test_distill import make_images  # noqa: E402
from tests.test_distill_resume import _resume_and_compare, kill_after_two_steps  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(image folder, tiny test_vit teacher weights file)."""
    tmp = tmp_path_factory.mktemp("online")
    make_images(tmp / "images", n=20)
    return tmp / "images", make_tiny_teacher_weights(tmp / "teacher.safetensors")


def online_cfg(images: Path, weights: Path, out: Path, **kw) -> DistillConfig:
    base = dict(
        teacher="test_vit", weights=str(weights), image_size=32, data=f"folder:{images}", out=str(out),
        student="test_vit", student_size=32, epochs=2, batch_size=12, views_per_image=3, workers=0,
        precision="fp32", device="cpu", val_fraction=0.2, warmup_epochs=0.5, temperatures=[0.02, 0.1],
    )  # fmt: skip
    base.update(kw)
    return DistillConfig(**base)


def test_online_targets_equal_a_k1_store_on_the_same_views(setup, tmp_path):
    images, weights = setup
    from cospress.extract import ExtractConfig, run_extract

    store = tmp_path / "store"
    run_extract(
        ExtractConfig(
            data=f"folder:{images}", teacher="test_vit", weights=str(weights), image_size=32, views=1, seed=3,
            shard_size=5, batch_size=16, workers=0, precision="fp32", device="cpu", out=str(store), row_order="source",
        )
    )  # fmt: skip
    reader = StoreReader(str(store))
    source = open_source(f"folder:{images}")
    assert reader.keys() == source.keys()  # store row = source position
    cfg = prepare(online_cfg(images, weights, tmp_path / "run", views_per_image=1, batch_size=20, seed=3))
    teacher = load_online_teacher(cfg, source.keys(), torch.device("cpu"))
    rows = np.arange(len(source))
    plan = BatchPlan(rows, seed=0, epoch=0, batch_size=20, views_per_image=1, stored_views=1)
    lazy = _Lazy(None, None, cfg.data, source=source)
    batch = DistillBatches(lazy, plan, rows, 32, True, "cpu", teacher.views)[0]
    got = teacher.features(batch, torch.device("cpu"))
    order = batch["rows"].numpy()
    cached = read_targets(reader, order, np.zeros((len(order), 1), np.int64), tokens=True)
    # epoch 0, view 0 online = stored view 0: the same keyed draw, bit for bit
    assert torch.equal(batch["params"], cached["params"])
    # the same teacher on the same replayed views: float16-rounded as the store keeps them
    torch.testing.assert_close(got.cls, cached["cls"].float(), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(got.tokens, cached["tokens"].float(), rtol=2e-3, atol=2e-3)
    assert not got.cls.is_inference()  # usable by the compressor's autograd
    # bytes mode: the teacher's views are decoded and replayed on the device (within a grey level)
    dev = DistillBatches(lazy, plan, rows, 32, True, "device", teacher.views)[0]
    assert (
        dev["images"] is None
        and dev.get("teacher_images") is None
        and torch.equal(dev["params"], batch["params"])
    )
    got_dev = teacher.features(dev, torch.device("cpu"))
    torch.testing.assert_close(got_dev.cls, got.cls, rtol=0, atol=0.05)
    torch.testing.assert_close(got_dev.tokens, got.tokens, rtol=0, atol=0.05)
    # the next epoch draws fresh views (view index epoch * R + j)
    w, h = source.load(0).image.size
    assert not np.array_equal(teacher.views.params(0, 0, [0], w, h), teacher.views.params(0, 1, [0], w, h))


def test_online_distill_through_the_cli(setup, tmp_path):
    images, weights = setup
    out = tmp_path / "run"
    run_cli(
        "distill", "--teacher", "test_vit", "--weights", str(weights), "--image-size", "32",
        "--data", f"folder:{images}", "--student", "test_vit", "--student-size", "32", "--epochs", "1",
        "--batch-size", "12", "--workers", "0", "--device", "cpu", "--val-fraction", "0.2", "--out", str(out),
    )  # fmt: skip
    header = json.loads((out / "run.json").read_text())
    assert header["store"] is None and header["teacher"]["name"] == "test_vit"
    assert header["teacher"]["online"]["seed"] == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["phase"] == "train"]
    assert train and all(np.isfinite(r["loss/total"]) for r in train)
    assert "loss/local" in train[0]  # the same cospress loss as the cached path
    assert [r for r in rows if r["phase"] == "val"]
    assert (out / "last.safetensors").is_file() or any(out.glob("last*"))
    # --store with --teacher is refused in one line
    bad = run_cli(
        "distill", "--teacher", "test_vit", "--data", f"folder:{images}", "--store", "x", check=False
    )
    assert bad.returncode == 2 and "reads no store" in error_line(bad)


def test_online_settings_are_checked(setup, tmp_path):
    images, weights = setup
    with pytest.raises(ConfigError, match="compressor_first"):
        prepare(online_cfg(images, weights, tmp_path, compressor_first=True))
    with pytest.raises(ConfigError, match="--data"):
        prepare(online_cfg(images, weights, tmp_path, data=None))
    with pytest.raises(ConfigError, match="online mode"):
        prepare(DistillConfig(store="s", limit=5))


KW = dict(epochs=2, save_every=1)


def test_online_sigkill_then_resume_gives_the_same_weights(setup, tmp_path):
    images, weights = setup
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # float sums depend on the thread count: match the subprocesses
    try:
        ref = run_distill(online_cfg(images, weights, tmp_path / "ref", **KW))
    finally:
        torch.set_num_threads(threads)
    steps = ref["steps"]
    assert steps >= 6
    cfg = to_dict(online_cfg(images, weights, tmp_path / "killed", workers=1, **KW))
    assert 2 <= kill_after_two_steps(cfg) < steps
    _resume_and_compare(cfg, tmp_path / "ref", steps)


def test_online_torchrun_two_ranks_match_one_rank(setup, tmp_path):
    """Two gloo ranks, each running the teacher on its slice, start with the one-rank run's losses."""
    from tests.helpers import two_ranks_start_like_one

    images, weights = setup
    one = online_cfg(images, weights, tmp_path / "one", epochs=1)
    run_distill(one)
    two_ranks_start_like_one(one, tmp_path / "one", ONLINE_FLAGS, tmp_path / "two")


ONLINE_FLAGS = (
    "teacher", "weights", "image_size", "data", "student", "student_size", "epochs", "batch_size",
    "views_per_image", "workers", "precision", "val_fraction", "warmup_epochs", "device",
)  # fmt: skip
