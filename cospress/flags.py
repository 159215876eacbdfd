"""Command-line flags generated from a config dataclass: one typer option (or argument) per field.

A field declared with :func:`cospress.config.setting` gives its flag name (``--field-name``,
``--x/--no-x`` for booleans, or the declared ``flag``), its help text and the default the help
shows. A stage's options default to None, meaning "not given": the YAML file (``--config``) and
then the dataclass default decide it (``cospress.config.load_config``); a store command's options
(``command_parameters``) carry the field's default themselves. Boolean flags show no ``<bool>``
type in ``--help`` (``PlainFlagsCommand``).
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

CLI_ONLY = ("config", "progress")  # flags of a stage command that are not config fields


def flag_names(f: dataclasses.Field) -> list[str]:
    """The flag of a config field: ``--field-name``, ``--x/--no-x`` for booleans, or its declared one."""
    if f.metadata.get("flag"):
        return [f.metadata["flag"]]
    dashed = "--" + f.name.replace("_", "-")
    return [f"{dashed}/--no-{dashed[2:]}"] if f.type in (bool, "bool") else [dashed]


def _flag_type(f: dataclasses.Field, hint: Any) -> Any:
    """The type typer parses; lists, tuples, dicts and unions arrive as text that the config coerces."""
    if f.metadata.get("repeatable") or (f.metadata.get("argument") and typing.get_origin(hint) is list):
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


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]


def command_parameters(cls: type) -> list[inspect.Parameter]:
    """One typer argument or option per field of a store command's config, with the field's default."""
    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        default = ... if _required(f) else f.default
        if f.metadata.get("argument"):
            info = typer.Argument(default, help=f.metadata["help"], show_default=False)
        else:
            names = flag_names(f)
            shown = False if _required(f) else f.metadata["shown"] or f.default not in (None, False, "")
            info = typer.Option(default, *names, help=f.metadata["help"], show_default=shown)
        kind = inspect.Parameter.KEYWORD_ONLY
        params.append(inspect.Parameter(f.name, kind, default=info, annotation=_flag_type(f, hints[f.name])))
    return params


def progress_parameter() -> inspect.Parameter:
    """``--progress/--no-progress``: the one declaration of the flag every long command has."""
    option = typer.Option(True, "--progress/--no-progress", help="Show a progress bar.")
    return inspect.Parameter("progress", inspect.Parameter.KEYWORD_ONLY, default=option, annotation=bool)


def _plain_flags(params: list) -> list:
    """A boolean flag takes no value: give it an empty metavar, so ``--help`` shows no ``<bool>``."""
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
    return params


class PlainFlagsCommand(TyperCommand):
    def get_params(self, ctx: Any) -> list:
        return _plain_flags(super().get_params(ctx))


class PlainFlagsGroup(TyperGroup):
    def get_params(self, ctx: Any) -> list:
        return _plain_flags(super().get_params(ctx))


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
