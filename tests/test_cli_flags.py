"""Each stage setting is declared once (a config field) and the CLI is generated from it.

A field without a flag, a flag without a field, a lost flag name that users know, or a YAML key
that no longer loads fails here.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

import cospress
from cospress.cli import app
from cospress.command_config import (
    ExportConfig,
    ExportWdsConfig,
    ImportWdsConfig,
    InspectConfig,
    MergeConfig,
    PublishConfig,
    VerifyConfig,
)
from cospress.config import load_config, save_config, to_dict
from cospress.distill import DistillConfig
from cospress.evaluate import EvalConfig
from cospress.extract import ExtractConfig
from cospress.flags import CLI_ONLY, config_parameters

STAGES = {"extract-teacher": ExtractConfig, "distill": DistillConfig, "knn-eval": EvalConfig}

# Every flag of the stage commands at 4724e22 (before the flags were generated): they keep working.
KNOWN_FLAGS = {
    "extract-teacher": "--data --teacher --weights --views --image-size --limit --tokens --no-tokens "
    "--center-view --no-center-view --seed --workers --batch-size --shard-size --scale-min --scale-max "
    "--flip --color-jitter --grayscale --blur --max-pixels --precision --device --decode --out "
    "--overwrite --append --config --progress --no-progress",
    "distill": "--store --student --student-size --student-kwargs --pretrained --random-init --method "
    "--compressor --compressor-first --compressor-epochs --views-per-image --epochs --batch-size --lr "
    "--min-lr --weight-decay --warmup-epochs --temperatures --tokens --no-tokens --data --cache-dir "
    "--expect-teacher --val-fraction --save-every --betas --grad-clip --w-local --w-global --w-tokens "
    "--w-cls --val-bank --val-k --val-temperature --seed --workers --precision --device --decode "
    "--compile --no-compile --attention --out --resume --config --progress --no-progress",
    "knn-eval": "--model --train --test --ood --ood-classes --k --temperature --protocol --bank-store "
    "--batch-size --workers --limit-train --limit-test --cache-dir --index --nlist --nprobe "
    "--fidelity-max --attack-max --ood-k --fidelity-teacher --robustness --no-robustness --attack "
    "--no-attack --robustness-max --crop-pct --seed --precision --device --decode --out --config",
}


def _command(name: str):
    group = typer.main.get_command(app)
    return group.get_command(group.context_class(group, info_name="cospress"), name)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_field_has_a_flag_and_every_flag_a_field(name: str) -> None:
    params = {p.name for p in _command(name).params if p.name != "help"}
    fields = {f.name for f in dataclasses.fields(STAGES[name])}
    assert fields - params == set(), f"config fields without a flag: {sorted(fields - params)}"
    assert params - fields - set(CLI_ONLY) == set(), f"flags without a field: {sorted(params - fields)}"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_the_flags_users_know_still_exist(name: str) -> None:
    opts = set()
    for p in _command(name).params:
        opts.update(p.opts)
        opts.update(p.secondary_opts)
    missing = set(KNOWN_FLAGS[name].split()) - opts
    assert not missing, f"{name} lost flags: {sorted(missing)}"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_help_lists_every_flag_with_its_default(name: str) -> None:
    cmd = _command(name)
    for param in cmd.params:
        if param.name in ("help", *CLI_ONLY):
            continue
        field = next(f for f in dataclasses.fields(STAGES[name]) if f.name == param.name)
        assert param.help == field.metadata["help"]
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        if default not in (None, "", False, [], {}) or field.metadata.get("shown"):
            assert isinstance(param.show_default, str) and param.show_default, param.name
    out = CliRunner().invoke(app, [name, "--help"], terminal_width=200).output
    assert "--views-per-image" in out or name != "distill"
    assert "[default:" in out


@pytest.mark.parametrize("name", sorted(STAGES))
def test_list_and_mapping_fields_take_text_the_config_parses(name: str) -> None:
    """A list[int] field must not become an int flag: `--ood-classes 5,6` is text split by the config."""
    hints = typing.get_type_hints(STAGES[name])
    params = {p.name: p for p in config_parameters(STAGES[name])}
    for f in dataclasses.fields(STAGES[name]):
        hint = hints[f.name]
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        container = typing.get_origin(hint) in (list, tuple, dict) or any(
            typing.get_origin(a) in (list, tuple, dict) for a in inner
        )
        if container and not f.metadata.get("repeatable"):
            assert params[f.name].annotation is str, f"{f.name}: {params[f.name].annotation}"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_yaml_keys_are_the_field_names(name: str, tmp_path) -> None:
    cls = STAGES[name]
    cfg = load_config(cls, None, {})
    save_config(cfg, tmp_path / "c.yaml")
    assert to_dict(load_config(cls, tmp_path / "c.yaml", {})) == to_dict(cfg)
    dashed = {k.replace("_", "-"): v for k, v in yaml.safe_load((tmp_path / "c.yaml").read_text()).items()}
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(dashed))
    assert to_dict(load_config(cls, tmp_path / "d.yaml", {})) == to_dict(cfg)


def test_flags_win_over_the_file_and_the_file_over_defaults(tmp_path) -> None:
    (tmp_path / "c.yaml").write_text("epochs: 7\nlr: 0.01\nstudent-kwargs: '{\"depth\": 2}'\n")
    cfg = load_config(DistillConfig, tmp_path / "c.yaml", {"lr": 0.5, "batch_size": None})
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.student_kwargs) == (7, 0.5, 192, {"depth": 2})


def test_an_unknown_yaml_key_is_a_one_line_error(tmp_path) -> None:
    (tmp_path / "c.yaml").write_text("epochz: 7\n")
    res = CliRunner().invoke(app, ["distill", "--config", str(tmp_path / "c.yaml")])
    assert res.exit_code == 2
    assert "unknown key(s) epochz" in res.output


def test_a_mapping_flag_takes_json_or_key_value_pairs() -> None:
    """--student-kwargs as its help says: a JSON object or k=v,k=v (the quickstart passes depth=6)."""
    kv = load_config(DistillConfig, None, {"student_kwargs": "depth=6,embed_dim=128,qkv_bias=false"})
    assert kv.student_kwargs == {"depth": 6, "embed_dim": 128, "qkv_bias": False}
    assert load_config(DistillConfig, None, {"student_kwargs": '{"depth": 6}'}).student_kwargs == {"depth": 6}
    res = CliRunner().invoke(app, ["distill", "--store", "s", "--student-kwargs", "depth"])
    assert res.exit_code == 2 and "'depth' is not key=value" in res.output


# The store commands: flags generated from cospress/command_config.py (each default written once).
STORE_COMMANDS = {
    "inspect": (InspectConfig, "--cache-dir --json --reference --rows"),
    "verify": (VerifyConfig, "--cache-dir"),
    "export": (ExportConfig, "--out --which"),
    "merge": (MergeConfig, "--out --shard-size --cache-dir --overwrite --progress --no-progress"),
    "export-wds": (ExportWdsConfig, "--out --samples-per-shard --cache-dir --progress --no-progress"),
    "import-wds": (ImportWdsConfig, "--out --overwrite --progress --no-progress"),
    "publish": (PublishConfig, "--overwrite --progress --no-progress"),
}


@pytest.mark.parametrize("name", sorted(STORE_COMMANDS))
def test_store_commands_flags_are_their_config_fields(name: str) -> None:
    cls, known = STORE_COMMANDS[name]
    cmd = _command(name)
    params = {p.name for p in cmd.params if p.name != "help"}
    assert params - {"progress"} == {f.name for f in dataclasses.fields(cls)}
    opts = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
    assert set(known.split()) <= opts, f"{name} lost flags: {sorted(set(known.split()) - opts)}"


def test_store_defaults_are_written_once() -> None:
    """The library functions take their defaults from the command configs (1000, 64, "best")."""
    from cospress.export import export_student
    from cospress.store.fidelity import measure_against
    from cospress.store.wds_io import export_wds

    def default(fn, name):
        return inspect.signature(fn).parameters[name].default

    assert default(export_wds, "samples_per_shard") == ExportWdsConfig.samples_per_shard == 1000
    assert default(measure_against, "rows") == InspectConfig.rows == 64
    assert default(export_student, "which") == ExportConfig.which == "best"
    src = "".join(p.read_text() for p in Path(cospress.__file__).parent.rglob("*.py"))
    assert src.count('"--progress/--no-progress"') == 1


@pytest.mark.parametrize("name", ["", *sorted(STAGES), *sorted(STORE_COMMANDS)])
def test_boolean_flags_show_no_type(name: str) -> None:
    out = CliRunner().invoke(app, [name, "--help"] if name else ["--help"], terminal_width=200).output
    assert "--help" in out and "<bool>" not in out


def test_a_store_command_parses_its_flags(tmp_path) -> None:
    """`export-wds` of a missing store: the flags parse into the config, the error is one line."""
    res = CliRunner().invoke(
        app, ["export-wds", str(tmp_path / "no"), "--out", str(tmp_path / "w"), "--no-progress"]
    )
    assert (
        res.exit_code == 2 and res.output.startswith("error:") and len(res.output.strip().splitlines()) == 1
    )


def test_an_error_line_prints_brackets_as_text(tmp_path) -> None:
    """`pip install 'cospress[onnx]'` or a path like `a[1]` in a message is not eaten as rich markup."""
    res = CliRunner().invoke(app, ["verify", str(tmp_path / "store[1]")])
    assert res.exit_code == 2 and "store[1]" in res.output, res.output
