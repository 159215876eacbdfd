"""Runs you can watch: `distill --logger tensorboard` writes every metrics row as scalars (read back
from the event file here); the default writes files only; an unknown or missing backend is one line."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cospress.cli import app
from cospress.distill import run_distill
from cospress.errors import ConfigError
from cospress.loggers import check_loggers, scalars
from tests.test_distill import make_store, tiny_cfg

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("store"))


def test_tensorboard_gets_every_row_of_metrics_jsonl(store, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_distill(tiny_cfg(store[0], out, logger=["tensorboard"], compressor_first=True, compressor_epochs=1))
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert tags == {tag for r in rows for tag in scalars(r)[1]}  # every number of every row
    for tag in ("loss/total", "loss/tokens", "loss/cls", "lr", "images_per_s", "time_data_s"):
        assert f"train/{tag}" in tags, tag  # loss terms, LR, views/s, data wait
    assert {"val/knn_accuracy", "reuse/shown_mean", "compressor/loss/total"} <= tags
    train = [r for r in rows if r["phase"] == "train"]
    logged = [(e.step, e.value) for e in acc.Scalars("train/loss/total")]
    assert logged == [(r["step"], pytest.approx(r["loss/total"], rel=1e-6)) for r in train]
    val = [(e.step, e.value) for e in acc.Scalars("val/knn_accuracy")]
    assert val == [
        (r["step"], pytest.approx(r["knn_accuracy"], rel=1e-6)) for r in rows if r["phase"] == "val"
    ]
    assert "config/text_summary" in acc.Tags()["tensors"]  # the run's settings, as text


def test_the_default_is_files_only_and_the_start_is_one_line(store, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="cospress"):
        run_distill(tiny_cfg(store[0], tmp_path / "run", epochs=1))
    starts = [r.getMessage() for r in caplog.records if r.getMessage().startswith("distill cospress:")]
    assert len(starts) == 1 and "\n" not in starts[0] and len(starts[0]) < 240, starts
    assert "test_vit @ 32 px" in starts[0] and "config.yaml" in starts[0]
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and "run header" in r.getMessage()]
    assert not (tmp_path / "run" / "tensorboard").exists() and (tmp_path / "run" / "metrics.jsonl").is_file()
    caplog.clear()  # watch a run from its resume on: --logger is no changed setting
    with caplog.at_level(logging.INFO, logger="cospress"):
        run_distill(tiny_cfg(store[0], tmp_path / "run", epochs=2, resume=True, logger=["tensorboard"]))
    changed = [r.getMessage() for r in caplog.records if "differ" in r.getMessage()]
    assert changed == ["resuming with settings that differ from the checkpoint's: epochs"]  # not logger
    acc = EventAccumulator(str(next((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss/total")]
    assert steps and min(steps) > 1  # the rows of the resumed epoch only


def test_a_bad_or_missing_logger_is_one_line_before_the_run(store, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--logger 'tensorbored' is unknown"):
        check_loggers(["tensorbored"])
    args = ["distill", "--store", store[0], "--out", str(tmp_path / "r"), "--no-progress"]
    res = CliRunner().invoke(app, [*args, "--logger", "tensorboard,nope"])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "'nope' is unknown" in res.output
    if importlib.util.find_spec("wandb") is None:  # never required: missing, it is one line too
        res = CliRunner().invoke(app, [*args, "--logger", "wandb"])
        assert res.exit_code == 2 and "needs the wandb package: pip install wandb" in res.output
    assert not (tmp_path / "r").exists()


def test_scalars_of_a_row() -> None:
    row = {"phase": "val", "epoch": 1, "step": 8, "knn_accuracy": 0.5, "fresh": False, "name": "x"}
    assert scalars(row) == (8, {"val/epoch": 1.0, "val/knn_accuracy": 0.5})
