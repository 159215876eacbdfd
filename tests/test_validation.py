"""One shape of validation for the three stage configs (issue 28): reading a config (flags, a YAML
file, the API's keywords) checks each value's type and choices only; every stage config's
``validate()`` checks the rest, called once, first, by the stage's runner, before anything loads. So
the command line, the Python API and a YAML file give the same one-line error for a bad value."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import cospress
from cospress.cli import app
from cospress.config import load_config
from cospress.distill import DistillConfig
from cospress.errors import ConfigError
from cospress.evaluate import EvalConfig
from cospress.extract import ExtractConfig

MISSING = "/nonexistent/cospress-validation"
# stage -> (config, API function, settings that would load a model or a store if anything came before
# the checks, the bad value, its one line)
CASES = {
    "extract-teacher": (
        ExtractConfig,
        "extract_teacher",
        {"data": f"folder:{MISSING}", "teacher": "no_such_teacher", "out": f"{MISSING}/store"},
        {"views": 0},
        "--views must be at least 1, got 0",
    ),
    "distill": (
        DistillConfig,
        "distill_student",
        {"store": f"{MISSING}/store", "out": f"{MISSING}/run"},
        {"val_fraction": 1.5},
        "val_fraction=1.5 must be in [0, 1)",
    ),
    "knn-eval": (
        EvalConfig,
        "knn_eval",
        {
            "model": f"{MISSING}/run",
            "train": f"folder:{MISSING}",
            "test": f"folder:{MISSING}",
            "out": f"{MISSING}/eval",
            "robustness": True,
        },  # fmt: skip
        {"k": [0]},
        "--k takes positive integers, e.g. --k 10,20",
    ),
}


def _flags(settings: dict) -> list[str]:
    out = []
    for k, v in settings.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else flag.replace("--", "--no-", 1))
        else:
            out += [flag, ",".join(map(str, v)) if isinstance(v, list) else str(v)]
    return out


@pytest.fixture
def validations(monkeypatch) -> dict[type, int]:
    """Calls of each stage config's validate() (the real one runs)."""
    calls: dict[type, int] = {}
    for cls, *_ in CASES.values():
        calls[cls] = 0

        def counted(self, real=cls.validate, cls=cls):
            calls[cls] += 1
            return real(self)

        monkeypatch.setattr(cls, "validate", counted)
    return calls


@pytest.mark.parametrize("stage", sorted(CASES))
def test_a_bad_value_is_the_same_line_from_the_cli_the_api_and_yaml_checked_once(
    stage: str, tmp_path: Path, validations: dict
) -> None:
    cls, api_name, good, bad, line = CASES[stage]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**good, **bad}))
    api = getattr(cospress, api_name)
    outputs = []
    for argv in (_flags({**good, **bad}), ["--config", str(tmp_path / "c.yaml")]):
        res = CliRunner().invoke(app, [stage, *argv])  # the progress bar on: it must not show
        outputs.append((res.exit_code, res.output))
    for kwargs in ({**good, **bad}, {"config": tmp_path / "c.yaml"}):
        with pytest.raises(ConfigError) as e:
            api(**kwargs)
        outputs.append((2, f"error: {e.value}\n"))
    # the settings' own line, not a missing store, source or model: nothing was loaded before the checks
    assert outputs == [(2, f"error: {line}\n")] * 4
    assert validations[cls] == 4  # once per call
    assert validations == {c: 4 if c is cls else 0 for c in validations}


def test_reading_a_config_checks_types_and_choices_only() -> None:
    """A partial config loads (a knn-eval YAML file the command line completes with --model);
    building or copying a config runs no check; each stage config has validate(), none __post_init__."""
    partial = load_config(EvalConfig, None, {})
    assert partial.model == ""
    with pytest.raises(ConfigError, match="no --model given"):
        partial.validate()
    assert dataclasses.replace(ExtractConfig(), views=0).views == 0  # refused by validate(), not here
    for cls, *_ in CASES.values():
        assert callable(cls.validate) and not hasattr(cls, "__post_init__"), cls
    with pytest.raises(ConfigError, match="--precision 'fp61' is unknown"):
        load_config(DistillConfig, None, {"precision": "fp61"})  # a choice: refused while read
