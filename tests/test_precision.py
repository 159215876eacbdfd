"""--precision: one home for its values (cospress.precision), refused in one line on every stage
before anything loads (the flag's choices are checked while the flags are read), one name per dtype."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from cospress import runtime
from cospress.config import load_config
from cospress.distill import DistillConfig
from cospress.errors import ConfigError
from cospress.evaluate import EvalConfig
from cospress.extract import ExtractConfig
from cospress.precision import PRECISIONS

STAGES = {"extract-teacher": ExtractConfig, "distill": DistillConfig, "knn-eval": EvalConfig}

_PROBE = """
import json, sys
from typer.testing import CliRunner
from cospress.cli import app
out = {}
for stage in %r:
    r = CliRunner().invoke(app, [stage, "--precision", "fp61"])
    out[stage] = [r.exit_code, r.output]
out["torch loaded"] = "torch" in sys.modules
print(json.dumps(out))
"""


def test_a_bad_precision_is_one_line_on_every_stage_before_torch_loads() -> None:
    code = _PROBE % (tuple(STAGES),)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out.pop("torch loaded") is False  # refused while the flags are read: no teacher, no torch
    for stage, (code_, text) in out.items():
        lines = text.strip().splitlines()
        assert code_ == 2 and len(lines) == 1, (stage, text)
        assert lines[0] == "error: --precision 'fp61' is unknown; use one of auto, bf16, fp32", stage


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_declares_the_same_choices(stage: str, tmp_path) -> None:
    field = next(f for f in dataclasses.fields(STAGES[stage]) if f.name == "precision")
    assert field.metadata["choices"] == PRECISIONS
    (tmp_path / "c.yaml").write_text("precision: float32\n")  # the YAML file is refused the same way
    with pytest.raises(ConfigError, match="--precision 'float32' is unknown"):
        load_config(STAGES[stage], tmp_path / "c.yaml", {})
    assert load_config(STAGES[stage], None, {"precision": "bf16"}).precision == "bf16"


def test_autocast_dtype_refuses_in_one_line_and_each_dtype_has_one_name() -> None:
    with pytest.raises(ConfigError, match="use one of auto, bf16, fp32"):
        runtime.autocast_dtype("fp61", torch.device("cpu"))
    assert runtime.dtype_name(runtime.autocast_dtype("fp32", torch.device("cpu"))) == "float32"
    assert runtime.dtype_name(runtime.autocast_dtype("bf16", torch.device("cpu"))) == "bfloat16"
