"""Command-line flags generated from a stage's config dataclass: one typer option per field.

A field declared with :func:`cospress.config.setting` gives its flag name (``--field-name``,
``--x/--no-x`` for booleans, or the declared ``flag``), its help text and the default the help
shows. Every option defaults to None, meaning "not given": the YAML file (``--config``) and then
the dataclass default decide it (``cospress.config.load_config``).
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from typing import Any

import typer

CLI_ONLY = ("config", "progress")  # flags of a stage command that are not config fields


def flag_names(f: dataclasses.Field) -> list[str]:
    """The flag of a config field: ``--field-name``, ``--x/--no-x`` for booleans, or its declared one."""
    if f.metadata.get("flag"):
        return [f.metadata["flag"]]
    dashed = "--" + f.name.replace("_", "-")
    return [f"{dashed}/--no-{dashed[2:]}"] if f.type in (bool, "bool") else [dashed]


def _flag_type(f: dataclasses.Field, hint: Any) -> Any:
    """The type typer parses; lists, tuples, dicts and unions arrive as text that the config coerces."""
    if f.metadata.get("repeatable"):
        return list[str]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = inner[0] if len(inner) == 1 else str
    return hint if hint in (bool, int, float, str) else str


def _shown_default(f: dataclasses.Field, flag: str) -> str | bool:
    if f.metadata.get("shown") is not None:
        return f.metadata["shown"]
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
    if isinstance(default, bool):
        on, _, off = flag.partition("/")
        return (on if default else off) or False
    if default is None or default == "" or default == [] or default == {}:
        return False
    if isinstance(default, (list, tuple)):
        return ",".join(str(v) for v in default)
    return str(default)


def config_parameters(cls: type) -> list[inspect.Parameter]:
    """One typer option per field of a stage config, defaulting to None (= not given on the line)."""
    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        names = flag_names(f)
        option = typer.Option(None, *names, help=f.metadata["help"], show_default=_shown_default(f, names[0]))
        kind = inspect.Parameter.KEYWORD_ONLY
        params.append(
            inspect.Parameter(f.name, kind, default=option, annotation=_flag_type(f, hints[f.name]))
        )
    return params
