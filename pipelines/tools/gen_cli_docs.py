#!/usr/bin/env python
"""Render docs/cli.md from the typer app, so the flag reference never drifts from `--help`.

.venv/bin/python pipelines/tools/gen_cli_docs.py            # rewrite docs/cli.md
.venv/bin/python pipelines/tools/gen_cli_docs.py --check    # exit 1 if docs/cli.md is stale
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # this checkout's cospress, not another one installed in the venv

from cospress.cli import app  # noqa: E402

DOC = ROOT / "docs" / "cli.md"

INTRO = """# Command line reference

Generated from the program by `pipelines/tools/gen_cli_docs.py` (do not edit by hand; rerun it
after changing a stage's `config.py`, `cospress/command_config.py` or the commands). `cospress COMMAND
--help` prints the same.

Every stage's flags are generated from its config dataclass (`cospress/extract/config.py`,
`cospress/distill/config.py`, `cospress/evaluate/config.py`), and the store commands' from theirs
(`cospress/command_config.py`), where each setting is declared once with its default and help.
A stage's `--config FILE.yaml` takes the same keys (the field names, with dashes
or underscores), and flags given on the command line win over the file, which wins over the
defaults. The resolved config is written beside every output (`config.yaml`; in a store, the
attributes of its `cospress/config/zarr.json`). Errors a user can fix end the
command with one `error:` line and exit code 2.

Global options (before the command): `-v/--verbose` (debug logging), `-q/--quiet` (warnings and
errors only), e.g. `cospress -q distill ...`.
"""


def _flag(param, ctx) -> str:
    if param.param_type_name == "argument":
        dots = "..." if param.nargs == -1 else ""
        return f"`{param.name.upper()}{dots}` (argument)"
    names = list(param.opts)
    if param.secondary_opts:
        names = [f"{a}/{b}" for a, b in zip(param.opts, param.secondary_opts, strict=False)]
    kind = "" if param.is_flag else " " + param.display_type(ctx).strip("<>").upper()
    text = ", ".join(f"`{n}{kind}`" for n in names)
    if param.multiple:
        text += " (repeatable)"
    return text


def _default(param) -> str:
    if isinstance(getattr(param, "show_default", None), str):  # a stage flag: the config field's default
        return f"`{param.show_default}`"
    if param.param_type_name == "argument" or param.default is None:
        return ""
    if getattr(param, "multiple", False) and not param.default:
        return ""
    value = param.default
    if param.is_flag and param.secondary_opts:
        return f"`{param.opts[0] if value else param.secondary_opts[0]}`"
    return f"`{value}`"


def _config_classes() -> dict[str, type]:
    from cospress.distill import DistillConfig
    from cospress.evaluate import EvalConfig
    from cospress.extract import ExtractConfig

    return {"extract-teacher": ExtractConfig, "distill": DistillConfig, "knn-eval": EvalConfig}


def _yaml_only(cmd, config_cls: type) -> list[str]:
    """`key: default` of the config fields that have no flag (settable in the --config file only)."""
    flagged = {p.name for p in cmd.params}
    keys = []
    for f in dataclasses.fields(config_cls):
        if f.name in flagged:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        keys.append(f"`{f.name}: {json.dumps(default)}`")
    return keys


def render() -> str:
    group = typer.main.get_command(app)
    ctx = group.context_class(group, info_name="cospress")
    lines = [INTRO]
    names = group.list_commands(ctx)
    lines.append("Commands: " + ", ".join(f"[`{n}`](#cospress-{n})" for n in names) + ".\n")
    for name in names:
        cmd = group.get_command(ctx, name)
        cmd_ctx = cmd.context_class(cmd, info_name=name, parent=ctx)
        args = [
            p.name.upper() + ("..." if p.nargs == -1 else "")
            for p in cmd.params
            if p.param_type_name == "argument"
        ]
        usage = " ".join([*args, "[OPTIONS]"])
        lines += [f"## cospress {name}", "", (cmd.help or "").strip(), "", f"    cospress {name} {usage}", ""]
        lines += ["| flag | help | default |", "|---|---|---|"]
        for param in cmd.params:
            if param.name == "help":
                continue
            help_text = (getattr(param, "help", None) or "").replace("|", "\\|")
            required = " (required)" if param.required else ""
            lines.append(f"| {_flag(param, cmd_ctx)}{required} | {help_text} | {_default(param)} |")
        lines.append("")
        config_cls = _config_classes().get(name)
        keys = _yaml_only(cmd, config_cls) if config_cls is not None else []
        if keys:
            lines += [
                f"Config keys of `{config_cls.__name__}` without a flag (set them in the `--config` "
                "file; shown with their defaults): " + ", ".join(keys) + ".",
                "",
            ]
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/cli.md differs")
    parser.add_argument("--out", default=str(DOC))
    args = parser.parse_args()
    text = render()
    out = Path(args.out)
    if args.check:
        if not out.is_file() or out.read_text() != text:
            print(f"{out} is stale; run pipelines/tools/gen_cli_docs.py", file=sys.stderr)
            return 1
        return 0
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
