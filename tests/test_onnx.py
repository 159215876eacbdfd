"""`cospress export --format onnx`: student.onnx (opset 18, dynamic batch) beside the safetensors,
checked at export time against the PyTorch student; here it is rerun on other images and batch sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cospress.cli import app
from cospress.distill import run_distill
from cospress.export import load_exported
from cospress.onnx_export import OPSET, TOLERANCE
from tests.test_distill import make_store, tiny_cfg

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("onnx")
    store, _ = make_store(tmp)
    run_distill(tiny_cfg(store, tmp / "run", epochs=1))
    return tmp / "run"


def test_export_onnx_matches_the_pytorch_student(run, tmp_path) -> None:
    out = tmp_path / "exp"
    res = CliRunner().invoke(
        app, ["export", str(run), "--out", str(out), "--format", "onnx"], terminal_width=200
    )
    assert res.exit_code == 0, res.output
    assert "onnx max abs diff vs PyTorch" in res.output  # printed at export time
    desc = json.loads((out / "student.json").read_text())
    assert desc["onnx"]["opset"] == OPSET and desc["onnx"]["max_abs_diff"] < TOLERANCE
    model = onnx.load(str(out / "student.onnx"))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [OPSET]
    student = load_exported(out)  # the PyTorch student of the same folder (safetensors)
    session = ort.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    for batch in (1, 3, 7):  # dynamic batch
        images = torch.from_numpy(rng.integers(0, 256, (batch, 3, 32, 32), dtype=np.uint8))
        with torch.no_grad():
            want = student(images)
        pixels = student.preprocess(images).numpy()
        cls, tokens = session.run(["cls", "tokens"], {"pixels": pixels})
        assert cls.shape == tuple(want.cls.shape) and tokens.shape == tuple(want.tokens.shape)
        assert np.abs(cls - want.cls.numpy()).max() < 1e-4
        assert np.abs(tokens - want.tokens.numpy()).max() < 1e-4


def test_the_default_format_writes_no_onnx(run, tmp_path) -> None:
    res = CliRunner().invoke(app, ["export", str(run), "--out", str(tmp_path / "e"), "--which", "last"])
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "e" / "student.onnx").exists()
    assert "onnx" not in json.loads((tmp_path / "e" / "student.json").read_text())
    res = CliRunner().invoke(app, ["export", str(run), "--out", str(tmp_path / "f"), "--format", "tflite"])
    assert res.exit_code == 2 and "--format 'tflite' is unknown; use one of safetensors, onnx" in res.output
