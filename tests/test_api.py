"""The Python API (cospress.extract_teacher / distill_student / knn_eval): the same settings as the
CLI (generated from the configs), the same results for the same settings, the same one-line errors,
and a cheap side-effect-free `import cospress`."""

from __future__ import annotations

import dataclasses
import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

import cospress
from cospress.cli import app
from cospress.distill import DistillConfig
from cospress.errors import ConfigError, CospressError
from cospress.evaluate import EvalConfig
from cospress.extract import ExtractConfig
from tests.helpers import make_image_folder, make_tiny_teacher_weights

API = {"extract_teacher": ExtractConfig, "distill_student": DistillConfig, "knn_eval": EvalConfig}


def test_import_is_cheap_and_loads_nothing() -> None:
    code = (
        "import sys, cospress; before = sorted(m for m in sys.modules if m.startswith('cospress')); "
        "f = cospress.distill_student; import inspect; inspect.signature(f); "
        "print(before, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['cospress'] False"


@pytest.mark.parametrize("name", sorted(API))
def test_keywords_are_the_config_fields(name: str) -> None:
    params = inspect.signature(getattr(cospress, name)).parameters
    fields = [f.name for f in dataclasses.fields(API[name])]
    assert list(params) == ["config", *fields, "progress"]
    for f in dataclasses.fields(API[name]):
        assert f.metadata["help"] in getattr(cospress, name).__doc__
        if f.default is not dataclasses.MISSING:
            assert params[f.name].default == f.default


def test_errors_are_the_one_line_cospress_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^distill_student\(\): unknown key\(s\) epochz;"):
        cospress.distill_student(epochz=3)
    with pytest.raises(ConfigError, match="--precision 'fp61' is unknown"):
        cospress.extract_teacher(precision="fp61")
    with pytest.raises(CospressError) as e:
        cospress.distill_student(store=str(tmp_path / "none"), out=str(tmp_path / "r"))
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("api")
    images = make_image_folder(tmp / "images", classes=2, per_class=6)
    weights = make_tiny_teacher_weights(tmp / "t.safetensors", img_size=32)
    return {"tmp": tmp, "data": f"folder:{images}", "weights": str(weights)}


def _flags(settings: dict) -> list[str]:
    out = []
    for k, v in settings.items():
        out += [f"--{k.replace('_', '-')}", ",".join(map(str, v)) if isinstance(v, list) else str(v)]
    return out


def _cli(command: str, settings: dict) -> None:
    res = CliRunner().invoke(app, [command, *_flags(settings), "--no-progress"])
    assert res.exit_code == 0, res.output


def _count_checks(monkeypatch) -> dict[str, int]:
    """Calls of each stage config's validate() and of distill's prepare (the real ones run)."""
    import cospress.distill.run as run_module

    calls = dict.fromkeys([*(c.__name__ for c in API.values()), "prepare"], 0)

    def counted(name: str, real):
        return lambda *a: calls.__setitem__(name, calls[name] + 1) or real(*a)

    for cls in API.values():
        monkeypatch.setattr(cls, "validate", counted(cls.__name__, cls.validate))
    monkeypatch.setattr(run_module, "prepare", counted("prepare", run_module.prepare))
    return calls


def test_api_results_equal_the_cli_results(setup: dict, monkeypatch) -> None:
    """... and each run, CLI or API, validates its config once and prepares a distill run once."""
    checks = _count_checks(monkeypatch)
    tmp, common = setup["tmp"], {"workers": 0, "precision": "fp32", "seed": 0}
    extract = {"data": setup["data"], "teacher": "test_vit", "weights": setup["weights"], "image_size": 32}
    extract.update(views=2, shard_size=6, batch_size=8, **common)
    _cli("extract-teacher", {**extract, "out": str(tmp / "cli-store")})
    store = cospress.extract_teacher(**extract, out=str(tmp / "api-store"))
    assert checks == {"ExtractConfig": 2, "DistillConfig": 0, "EvalConfig": 0, "prepare": 0}
    assert store.store == str(tmp / "api-store") and store.summary["images"] == 12
    a, b = zarr.open_group(str(tmp / "cli-store"), mode="r"), zarr.open_group(store.store, mode="r")
    for name in ("cls", "tokens", "views", "keys", "valid"):
        assert np.array_equal(a[name][...], b[name][...]), name

    distill = {"store": store.store, "student": "test_vit", "student_size": 32, "epochs": 1, "batch_size": 8}
    distill.update(views_per_image=2, val_fraction=0.25, temperatures=[0.02, 0.1], **common)
    _cli("distill", {**distill, "out": str(tmp / "cli-run")})
    run = cospress.distill_student(**distill, out=str(tmp / "api-run"))
    assert run.run == str(tmp / "api-run") and run.best["epoch"] == 0
    rows = {}
    for which in ("cli-run", "api-run"):
        lines = (tmp / which / "metrics.jsonl").read_text().splitlines()
        rows[which] = [json.loads(x) for x in lines]
    assert run.best == next(r for r in rows["cli-run"] if r["phase"] == "val")
    losses = {k: [r["loss/total"] for r in v if "loss/total" in r] for k, v in rows.items()}
    assert checks == {"ExtractConfig": 2, "DistillConfig": 2, "EvalConfig": 0, "prepare": 2}
    assert len(losses["cli-run"]) == 3 and losses["api-run"] == pytest.approx(losses["cli-run"], rel=1e-5)

    knn = {
        "train": setup["data"],
        "test": setup["data"],
        "k": [1, 3],
        "crop_pct": 1.0,
        "cache_dir": "",
        **common,
    }
    _cli("knn-eval", {**knn, "model": str(tmp / "cli-run"), "out": str(tmp / "cli-eval")})
    report = cospress.knn_eval(**knn, model=run.run, out=str(tmp / "api-eval"))
    cli_report = json.loads((tmp / "cli-eval" / "report.json").read_text())
    assert report.out == str(tmp / "api-eval") and report.report["knn"] == cli_report["knn"]
    assert report.report["top1"] == cli_report["top1"]
    assert checks == {"ExtractConfig": 2, "DistillConfig": 2, "EvalConfig": 2, "prepare": 2}


def test_the_docs_example_calls_real_functions_with_real_settings() -> None:
    """docs/api.md's example (run by hand: see the page) names real functions and settings only."""
    import ast
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    calls = [
        n for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
    ]
    called = {
        c.func.attr: {k.arg for k in c.keywords}
        for c in calls
        if getattr(c.func.value, "id", "") == "cospress"
    }
    assert set(called) == set(API)
    for name, keywords in called.items():
        assert keywords <= {f.name for f in dataclasses.fields(API[name])}, name
