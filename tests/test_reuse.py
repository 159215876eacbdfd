"""Reuse accounting (issue 27): how many times each stored view is shown, per epoch, in run.json and
metrics.jsonl; the start-up line, the planner and the warning past the measured reuse."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cospress.distill import reuse as ru  # noqa: E402
from cospress.distill import run_distill  # noqa: E402
from cospress.distill.data import BatchPlan  # noqa: E402
from tests.test_distill import make_store, tiny_cfg  # noqa: E402


def brute_counts(rows: np.ndarray, epochs: int, batch: int, r: int, k: int, seed: int) -> np.ndarray:
    """Times each (row, view) is shown, read off the batch plans step by step."""
    counts = np.zeros((rows.max() + 1, k), np.int64)
    for epoch in range(epochs):
        plan = BatchPlan(rows, seed=seed, epoch=epoch, batch_size=batch, views_per_image=r, stored_views=k)
        for step in range(len(plan)):
            rws, views = plan.rows_views(step)
            for row, vs in zip(rws, views, strict=True):
                counts[row, vs] += 1
    return counts[rows]


@pytest.mark.parametrize(("r", "k"), [(2, 5), (3, 3)])
def test_counter_equals_the_batch_plans(r, k):
    rows = np.arange(3, 40, dtype=np.int64)  # 37 rows: the last partial batch is dropped every epoch
    counter = ru.ReuseCounter(rows, seed=7, views_per_image=r, images_per_batch=12 // r, stored_views=k)
    for epoch in range(4):
        counter.add_epoch(epoch)
    want = brute_counts(rows, 4, 12, r, k, seed=7)
    rec = counter.record(3)
    assert rec["shown_mean"] == pytest.approx(want.mean()) and rec["shown_max"] == want.max()
    assert rec["distinct_views_mean"] == pytest.approx((want > 0).sum(1).mean())
    assert rec["stored_views"] == k and rec["fresh"] is False and rec["rows_counted"] == 37
    assert rec["shown_mean"] <= ru.planned_reuse(4, r, k)  # dropped partial batches show fewer


def test_planner_line_and_recommended_k(monkeypatch):
    monkeypatch.setattr(ru, "LOSS_REUSE", None)
    monkeypatch.setattr(ru, "MEASURED_REUSE", 100.0)
    assert ru.planned_reuse(300, 3, 10) == 90.0
    assert ru.recommend_k(300, 3) == 9 and ru.recommend_k(1, 3) == 3  # never fewer than R
    line = ru.plan_line(1000, 300, 3, 10, store_bytes=5 * 2**20)
    assert "~90.0 times" in line and "5.0 MiB" in line and "K for this schedule: >= 9" in line
    assert ru.reuse_warning(300, 3, 10) is None
    warn = ru.reuse_warning(300, 3, 4)  # reuse 225 > the 100 measured
    assert "unmeasured" in warn and "K >= 9" in warn
    monkeypatch.setattr(ru, "LOSS_REUSE", 50.0)
    monkeypatch.setattr(ru, "SAFE_REUSE", None)
    warn = ru.reuse_warning(300, 3, 10)
    assert "behind online from reuse 50" in warn and "K >= 18" in warn
    monkeypatch.setattr(ru, "LOSS_REUSE", 100.0)  # a loss measured at 100, none at 33
    monkeypatch.setattr(ru, "SAFE_REUSE", 100 / 3)
    assert ru.reuse_warning(100, 1, 3) is None  # reuse 33.3: measured, no loss
    warn = ru.reuse_warning(100, 1, 2)  # reuse 50: between the two measured points
    assert "between them is unmeasured" in warn and "K >= 3" in warn
    assert "behind online from reuse 100" in ru.reuse_warning(100, 1, 1)
    assert "fresh views" in ru.plan_line(100, 2, 3, None)


def test_distill_records_reuse_per_epoch_and_warns(tmp_path, caplog, monkeypatch):
    url, _ = make_store(tmp_path, n=16, k=4, shard_size=16)
    monkeypatch.setattr(ru, "MEASURED_REUSE", 1.0)  # 3 epochs x R=2 / 4 views = 1.5 > 1: warns
    monkeypatch.setattr(ru, "LOSS_REUSE", None)
    with caplog.at_level("INFO"):
        run_distill(
            tiny_cfg(url, tmp_path / "run", epochs=3, batch_size=12, views_per_image=2, val_fraction=0.0)
        )
    assert "reuse: 16 images x 4 stored views" in caplog.text
    warnings = [
        r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "reuse" in r.getMessage()
    ]
    assert len(warnings) == 1 and "K >= 6" in warnings[0]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    reuse_rows = [x for x in rows if x["phase"] == "reuse"]
    assert [x["epoch"] for x in reuse_rows] == [0, 1, 2]
    want = brute_counts(np.arange(16), 3, 12, 2, 4, seed=0)
    last = reuse_rows[-1]
    assert last["shown_mean"] == pytest.approx(want.mean()) and last["shown_max"] == want.max()
    assert last["distinct_views_mean"] == pytest.approx((want > 0).sum(1).mean())
    assert last["distinct_views_mean"] <= 4
    header = json.loads((tmp_path / "run" / "run.json").read_text())
    assert header["config"]["epochs"] == 3  # the header is kept
    assert header["reuse"]["planned_reuse"] == 1.5 and header["reuse"]["warning"] == warnings[0]
    assert header["reuse"]["per_epoch"] == reuse_rows


def test_online_runs_say_fresh_views(tmp_path, caplog):
    from tests.helpers import make_tiny_teacher_weights
    from tests.test_distill import make_images
    from tests.test_distill_online import online_cfg

    make_images(tmp_path / "images", n=12)
    weights = make_tiny_teacher_weights(tmp_path / "teacher.safetensors")
    cfg = online_cfg(tmp_path / "images", weights, tmp_path / "run", val_fraction=0.0, batch_size=12)
    with caplog.at_level("INFO"):
        run_distill(cfg)
    assert "reuse: fresh views (online)" in caplog.text
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    reuse_rows = [x for x in rows if x["phase"] == "reuse"]
    assert [(x["fresh"], x["shown_max"], x["distinct_views_mean"]) for x in reuse_rows] == [
        (True, 1, 3.0),
        (True, 1, 6.0),
    ]
    header = json.loads((tmp_path / "run" / "run.json").read_text())["reuse"]
    assert header["fresh"] is True and header["planned_reuse"] is None and header["warning"] is None


def test_plan_command_prints_reuse_size_and_the_recommended_k():
    # the study's numbers: a loss at reuse 100, none at 33.3 -> K >= 900 / 33.3 = 27 for 300 x R=3
    from tests.helpers import run_cli

    proc = run_cli("plan", "--images", "1281167", "--views", "4", "--views-per-image", "3", "--epochs", "300")
    out = proc.stdout + proc.stderr  # the table, then the warning line
    assert "225.0" in out and "recommended K" in out and "27 (reuse <= 33.3" in out.replace("\n", " ")
    assert "GiB" in out and "warning" in out and "--add-views 23" in " ".join(out.split())
