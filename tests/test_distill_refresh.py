"""The hybrid mode ``cospress distill --refresh F`` (issue 27): a fraction F of each batch's views drawn
fresh from the store's view policy and run through the store's teacher, the rest read from the store.

Checked: the fraction of fresh slots per batch and that they are a pure function of (seed, epoch,
step); the fresh views' params are the keyed draws numbered after the stored views (so with the
store's seed they are the views a larger store holds next) and their targets are that larger store's;
F = 1 reads no stored target; SIGKILL + --resume gives bitwise the weights of an uninterrupted run; a
--teacher other than the store's, a teacher file that is not the store's and the stream reader are
refused in one line; the reuse accounting (counter, run.json, metrics.jsonl, the start-up line).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from cospress.config import to_dict  # noqa: E402
from cospress.distill import DistillConfig, run_distill  # noqa: E402
from cospress.distill import reuse as ru  # noqa: E402
from cospress.distill.data import BatchPlan, DistillBatches, read_targets  # noqa: E402
from cospress.distill.refresh import fresh_count, fresh_mask  # noqa: E402
from cospress.distill.run import open_train_data, prepare  # noqa: E402
from cospress.errors import ConfigError, StoreError  # noqa: E402
from cospress.store.reader import StoreReader  # noqa: E402
from tests.helpers import error_line, make_tiny_teacher_weights, run_cli  # noqa: E402
from tests.test_distill import make_images  # noqa: E402
from tests.test_distill_resume import _resume_and_compare, kill_after_two_steps  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(images, teacher weights, a K=2 store, a K=4 store of the same seed), tiny test_vit teacher at 32 px."""
    tmp = tmp_path_factory.mktemp("refresh")
    make_images(tmp / "images", n=20)
    weights = make_tiny_teacher_weights(tmp / "teacher.safetensors")
    return tmp / "images", weights, _extract(tmp, weights, 2), _extract(tmp, weights, 4)


def _extract(tmp: Path, weights: Path, k: int) -> Path:
    from cospress.extract import ExtractConfig, run_extract

    run_extract(
        ExtractConfig(
            data=f"folder:{tmp / 'images'}", teacher="test_vit", weights=str(weights), image_size=32, views=k,
            seed=3, shard_size=5, batch_size=16, workers=0, precision="fp32", device="cpu", out=str(tmp / f"k{k}"),
        )
    )  # fmt: skip
    return tmp / f"k{k}"


def refresh_cfg(store: Path, weights: Path, images: Path, out: Path, **kw) -> DistillConfig:
    base = dict(
        store=str(store), weights=str(weights), data=f"folder:{images}", out=str(out), refresh=0.25,
        student="test_vit", student_size=32, epochs=2, batch_size=12, views_per_image=2, workers=0,
        precision="fp32", device="cpu", val_fraction=0.2, warmup_epochs=0.5, temperatures=[0.02, 0.1], seed=3,
    )  # fmt: skip
    base.update(kw)
    return DistillConfig(**base)


def test_fresh_slots_are_a_fraction_of_each_batch_and_keyed():
    assert [fresh_count(200, f) for f in (0.0, 0.25, 1.0, 0.001)] == [0, 50, 200, 1]
    a = fresh_mask(0, 3, 5, images=100, views_per_image=2, fraction=0.25)
    assert a.shape == (100, 2) and a.sum() == 50
    assert np.array_equal(a, fresh_mask(0, 3, 5, 100, 2, 0.25))  # (seed, epoch, step) -> the same slots
    others = [fresh_mask(*key, 100, 2, 0.25) for key in ((1, 3, 5), (0, 4, 5), (0, 3, 6))]
    assert all(not np.array_equal(a, b) for b in others)
    assert fresh_mask(0, 0, 0, 10, 3, 1.0).all() and not fresh_mask(0, 0, 0, 10, 3, 0.0).any()


def _batch(cfg: DistillConfig, rank: int = 0, world: int = 1, step: int = 0, epoch: int = 0):
    cfg = prepare(cfg)
    data = open_train_data(cfg, world, torch.device("cpu"))
    plan = BatchPlan(data.split.train, seed=cfg.seed, epoch=epoch, batch_size=cfg.batch_size,
                     views_per_image=cfg.views_per_image, stored_views=data.reader.stored_views,
                     rank=rank, world=world)  # fmt: skip
    batches = DistillBatches(data.lazy, plan, data.source_index, 32, True, "cpu", data.refresh.views)
    return cfg, data, plan, batches[step]


def test_fresh_views_are_the_next_views_of_a_larger_store(setup, tmp_path):
    """K=2 store, seed 3, F=1: epoch 0's fresh views are views 2, 3 of the same-seed K=4 store, with its targets."""
    images, weights, k2, k4 = setup
    cfg, data, plan, batch = _batch(refresh_cfg(k2, weights, images, tmp_path / "r", refresh=1.0))
    assert batch["fresh"].all() and batch["teacher_images"].shape[0] == cfg.batch_size
    rows = batch["rows"].numpy()
    want = read_targets(StoreReader(str(k4)), rows, np.tile([2, 3], (len(rows), 1)), tokens=True)
    assert torch.equal(batch["params"], want["params"])  # the keyed draws after the stored views
    stored = data.refresh.features(
        batch, torch.device("cpu"), None
    )  # online form: every view from the teacher
    torch.testing.assert_close(stored.cls, want["cls"].float(), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(stored.tokens, want["tokens"].float(), rtol=2e-3, atol=2e-3)


def test_a_fraction_of_the_batch_is_fresh_the_rest_read(setup, tmp_path):
    images, weights, k2, k4 = setup
    cfg, data, plan, batch = _batch(refresh_cfg(k2, weights, images, tmp_path / "r", refresh=0.25), step=0)
    fresh = batch["fresh"].numpy()
    assert fresh.sum() == 3 and batch["teacher_images"].shape[0] == 3  # 25% of 12 views
    full = fresh_mask(cfg.seed, 0, 0, plan.images_per_batch, 2, 0.25).reshape(-1)
    assert np.array_equal(fresh, full)
    rows, views = plan.rows_views(0)
    cached = read_targets(data.reader, rows, views, tokens=True)
    assert torch.equal(batch["params"][~fresh], cached["params"][~fresh])  # stored views replayed as recorded
    assert not torch.equal(batch["params"][fresh], cached["params"][fresh])
    from cospress.distill.model import teacher_features

    got = data.refresh.features(batch, torch.device("cpu"), teacher_features(batch, torch.device("cpu")))
    assert torch.equal(got.cls[~fresh], cached["cls"].float()[~fresh])  # read from the store
    assert not torch.allclose(got.cls[fresh], cached["cls"].float()[fresh])  # the teacher's, on new views
    # bytes mode: the fresh views are decoded and replayed on the device (within a grey level)
    lazy, index = data.lazy, data.source_index
    dev = DistillBatches(lazy, plan, index, 32, True, "device", data.refresh.views)[0]
    assert (
        dev["images"] is None
        and dev.get("teacher_images") is None
        and torch.equal(dev["fresh"], batch["fresh"])
    )
    got_dev = data.refresh.features(dev, torch.device("cpu"), teacher_features(dev, torch.device("cpu")))
    torch.testing.assert_close(got_dev.cls, got.cls, rtol=0, atol=0.05)
    torch.testing.assert_close(got_dev.tokens, got.tokens, rtol=0, atol=0.05)
    # two ranks: each takes its images' rows of the global mask
    _, _, _, half = _batch(refresh_cfg(k2, weights, images, tmp_path / "r2", refresh=0.25), rank=1, world=2)
    assert np.array_equal(half["fresh"].numpy(), full[len(full) // 2 :])


def test_refresh_run_records_reuse_and_fresh_views(setup, tmp_path):
    images, weights, k2, _ = setup
    out = tmp_path / "run"
    proc = run_cli(
        "distill", "--store", str(k2), "--weights", str(weights), "--data", f"folder:{images}", "--refresh", "0.5",
        "--student", "test_vit", "--student-size", "32", "--epochs", "2", "--batch-size", "12",
        "--views-per-image", "2", "--workers", "0", "--device", "cpu", "--precision", "fp32",
        "--val-fraction", "0.2", "--seed", "3", "--out", str(out), "--no-progress",
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert "--refresh 0.5" in log and "fresh views per image" in log
    header = json.loads((out / "run.json").read_text())
    assert header["teacher"]["refresh"] == {"fraction": 0.5, "seed": 3, "first_view": 2}
    reuse = header["reuse"]
    assert reuse["refresh"] == 0.5 and reuse["planned_reuse"] == pytest.approx(2 * 2 * 0.5 / 2)
    assert reuse["planned_fresh_views"] == pytest.approx(2.0)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["phase"] == "train"]
    assert train and all(np.isfinite(r["loss/total"]) for r in train)
    per_epoch = [r for r in rows if r["phase"] == "reuse"]
    assert [r["epoch"] for r in per_epoch] == [0, 1] and per_epoch == reuse["per_epoch"]
    last = per_epoch[-1]
    steps = reuse["images"] // 6  # per epoch: 6 images (12 views) per batch, all training rows counted
    assert last["refresh"] == 0.5 and last["rows_counted"] == reuse["images"]
    shown = (last["shown_mean"] * last["stored_views"] + last["fresh_views_mean"]) * last["rows_counted"]
    assert shown == pytest.approx(2 * steps * 12)  # every view shown is either a stored or a fresh one
    assert last["fresh_views_mean"] * last["rows_counted"] == pytest.approx(
        2 * steps * 6
    )  # 6 fresh per batch


def test_refused_in_one_line(setup, tmp_path):
    images, weights, k2, _ = setup
    with pytest.raises(StoreError, match="made by teacher test_vit"):
        prepare(refresh_cfg(k2, weights, images, tmp_path / "a", teacher="vit_small_patch14_dinov2"))
    assert prepare(refresh_cfg(k2, weights, images, tmp_path / "b", teacher="test_vit")).refresh == 0.25
    with pytest.raises(ConfigError, match="stream reader"):
        prepare(refresh_cfg(k2, weights, images, tmp_path / "c", reader="stream"))
    for bad in (dict(refresh=1.5), dict(refresh=-0.1), dict(limit=5), dict(image_size=64)):
        with pytest.raises(ConfigError):
            prepare(refresh_cfg(k2, weights, images, tmp_path / "d", **bad))
    # a teacher file that is not the one the store was extracted with: its fingerprint differs
    other = make_tiny_teacher_weights(tmp_path / "other.safetensors", seed=1)
    bad = run_cli(
        "distill", "--store", str(k2), "--refresh", "0.5", "--weights", str(other), "--data", f"folder:{images}",
        "--student", "test_vit", "--student-size", "32", "--batch-size", "12", "--views-per-image", "2",
        "--device", "cpu", "--workers", "0", "--out", str(tmp_path / "e"), check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and "fingerprint" in error_line(bad) and "--weights" in error_line(bad)
    bad = run_cli("distill", "--store", str(k2), "--refresh", "0.5", "--teacher", "resnet18", check=False)
    assert bad.returncode == 2 and "not resnet18" in error_line(bad)


def brute(rows: np.ndarray, epochs: int, batch: int, r: int, k: int, seed: int, f: float):
    """(stored counts [rows, K], fresh views [rows]) read off the batch plans and fresh masks step by step."""
    counts, fresh = np.zeros((rows.max() + 1, k), np.int64), np.zeros(rows.max() + 1, np.int64)
    for epoch in range(epochs):
        plan = BatchPlan(rows, seed=seed, epoch=epoch, batch_size=batch, views_per_image=r, stored_views=k)
        for step in range(len(plan)):
            rws, views = plan.rows_views(step)
            mask = fresh_mask(seed, epoch, step, len(rws), r, f)
            for row, vs, m in zip(rws, views, mask, strict=True):
                counts[row, vs[~m]] += 1
                fresh[row] += m.sum()
    return counts[rows], fresh[rows]


def test_reuse_counts_show_stored_views_less_and_count_fresh_ones():
    rows = np.arange(3, 40, dtype=np.int64)
    counter = ru.ReuseCounter(
        rows, seed=7, views_per_image=2, images_per_batch=6, stored_views=3, refresh=0.25
    )
    for epoch in range(5):
        counter.add_epoch(epoch)
    counts, fresh = brute(rows, 5, 12, 2, 3, seed=7, f=0.25)
    rec = counter.record(4)
    assert rec["shown_mean"] == pytest.approx(counts.mean()) and rec["shown_max"] == counts.max()
    assert (
        rec["fresh_views_mean"] == pytest.approx(fresh.mean()) and fresh.sum() == 5 * 6 * 3
    )  # 3 of 12 per batch
    assert rec["distinct_views_mean"] == pytest.approx(((counts > 0).sum(1) + fresh).mean())
    assert rec["refresh"] == 0.25 and rec["stored_views"] == 3
    # the plan: stored views shown (1 - F) as often; the warning and the recommended K follow
    assert ru.planned_reuse(100, 1, 1, refresh=0.25) == 75.0
    assert ru.recommend_k(100, 1, limit=25, refresh=0.5) == 2 and ru.recommend_k(100, 1, limit=25) == 4
    # the study measured --refresh 0.25 at reuse 100 (stored views shown 75 times): no warning up to there
    assert (
        ru.reuse_warning(100, 1, 1, refresh=0.25) is None and ru.reuse_warning(100, 1, 1, refresh=0.5) is None
    )
    warn = ru.reuse_warning(300, 1, 1, refresh=0.25)  # stored reuse 225: beyond what was measured
    assert (
        warn.startswith("planned reuse 225 ")
        and "x (1 - refresh 0.25)" in warn
        and "add --refresh" not in warn
    )
    assert "add --refresh 0.25" in ru.reuse_warning(100, 1, 1)  # a cached run past the loss is told of it
    proc = run_cli("plan", "--images", "400", "--views", "1", "--views-per-image", "1", "--epochs", "100",
                   "--refresh", "0.25")  # fmt: skip
    out = " ".join((proc.stdout + proc.stderr).split())
    assert "75.0" in out and "fresh views per image" in out and "warning" not in out  # measured: no warning
    line = ru.plan_line(400, 100, 1, 1, refresh=0.25)
    assert "~75.0 times" in line and "~25 fresh views per image" in line and "10,000 teacher forwards" in line


KW = dict(epochs=2, save_every=1, refresh=0.5)


def test_refresh_sigkill_then_resume_gives_the_same_weights(setup, tmp_path):
    images, weights, k2, _ = setup
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # float sums depend on the thread count: match the subprocesses
    try:
        ref = run_distill(refresh_cfg(k2, weights, images, tmp_path / "ref", **KW))
    finally:
        torch.set_num_threads(threads)
    steps = ref["steps"]
    assert steps >= 4
    cfg = to_dict(refresh_cfg(k2, weights, images, tmp_path / "killed", workers=1, **KW))
    assert 2 <= kill_after_two_steps(cfg) < steps
    _resume_and_compare(cfg, tmp_path / "ref", steps)


def test_refresh_torchrun_two_ranks_match_one_rank(setup, tmp_path):
    """Two gloo ranks (each running the teacher on its images' fresh views) start with the one-rank losses:
    the fresh slots are chosen over the global batch, not per rank."""
    from tests.helpers import two_ranks_start_like_one

    images, weights, k2, _ = setup
    one = refresh_cfg(k2, weights, images, tmp_path / "one", epochs=1, refresh=0.5)
    run_distill(one)
    two_ranks_start_like_one(one, tmp_path / "one", FLAGS, tmp_path / "two")


FLAGS = (
    "store", "weights", "data", "refresh", "student", "student_size", "epochs", "batch_size", "views_per_image",
    "workers", "precision", "val_fraction", "warmup_epochs", "device", "seed",
)  # fmt: skip
