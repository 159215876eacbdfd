"""Typed configs: defaults < YAML file < command-line flags, saved beside every output.

Each stage defines one dataclass (``ExtractConfig``, ``DistillConfig``, ``EvalConfig``) in its
``config.py``. Every field is declared once, with :func:`setting`: its default and its help text.
The CLI flags (``cospress/flags.py``), the YAML keys and docs/cli.md are generated from the fields.
This module holds the declaration helper and the merge and save logic they share.

Validation has one shape: reading (:func:`load_config`) checks each value's type and ``choices``; each
stage config's ``validate()`` checks the rest, called once, first, by the stage's runner.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from cospress.errors import ConfigError
from cospress.precision import PRECISIONS
from cospress.utils import atomic_write_bytes, redact_config

C = TypeVar("C")


def default_workers() -> int:
    """DataLoader processes: one core is left to the model; 1 on a 2-core machine, at most 8."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    factory: Any = None,
    flag: str | None = None,
    shown: str | None = None,
    repeatable: bool = False,
    argument: bool = False,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """A config field: its default and help text, written once.

    ``flag`` overrides the generated flag (``--field-name``, ``--x/--no-x`` for booleans), for the
    names users already know (e.g. ``--tokens/--no-tokens``); ``shown`` is the default as the help
    text prints it, when the value itself says little (a factory, or None meaning "the teacher's");
    ``repeatable`` makes a list field a flag given once per value; ``argument`` makes the field a
    positional argument (the store commands' STORE, RUN, ...); ``choices`` are the only values the
    field takes (any other is refused in one line while the flags or the YAML file are read).
    """
    meta = {"help": help, "flag": flag, "shown": shown, "repeatable": repeatable, "argument": argument}
    meta["choices"] = choices
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# The runtime settings every stage has, declared once (each call makes a fresh field).
def device_setting() -> Any:
    return setting("auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")


def precision_setting() -> Any:
    return setting(
        "auto",
        help="auto (bf16 on CUDA and on CPUs with AMX or AVX-512 BF16), bf16 or fp32; losses stay fp32.",
        choices=PRECISIONS,
    )


def workers_setting(what: str) -> Any:
    return setting(help=f"Worker processes ({what}).", factory=default_workers, shown="cores - 1, at most 8")


def decode_setting() -> Any:
    return setting(
        "auto",
        help="Image decode: cpu (PIL in workers), gpu (nvjpeg + resize on the GPU), device, or auto (gpu on CUDA).",
    )


# The crop, flip, RandAugment and erasing of a view, shared by stage 1 and stage 2's online mode:
# each setting's default (also `data.policy.ViewPolicy`'s) and help, written once.
VIEW_SETTINGS: dict[str, tuple[Any, str]] = {
    "scale_min": (0.08, "RandomResizedCrop minimum area."),
    "scale_max": (1.0, "RandomResizedCrop maximum area."),
    "flip": (0.5, "Probability of a horizontal flip."),
    "rand_augment": (
        "",
        "RandAugment as timm's string, e.g. rand-m9-mstd0.5-inc1 (the paper's); empty = off.",
    ),
    "erase_prob": (0.0, "Probability of random erasing (timm RandomErasing, one box)."),
    "erase_mode": (
        "pixel",
        "Erasing fill: pixel (noise, timm train.py / DeiT), rand (one colour) or const (the mean).",
    ),
}


def view_setting(name: str, prefix: str = "") -> Any:
    """The config field of view setting ``name`` (a key of ``VIEW_SETTINGS``); ``prefix`` starts its help."""
    default, text = VIEW_SETTINGS[name]
    return setting(default, help=f"{prefix}{text}")


def mapping_from_text(name: str, text: str) -> dict[str, Any]:
    """A mapping given as text: a JSON object, or ``k=v,k=v`` with each value read as a YAML scalar."""
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise ConfigError(f"{name}: expected a JSON object or k=v,k=v, got {text!r}") from None
    import yaml

    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, val = part.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{name}: {part!r} is not key=value; use e.g. depth=6,embed_dim=128")
        out[key.strip()] = yaml.safe_load(val)
    return out


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Convert a YAML / CLI value to the field's declared type, or raise ConfigError."""
    if value is None:
        return None
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(name, inner[0], value)
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        elem = args[0] if args else Any
        out = [_coerce(name, elem, v) for v in value]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = mapping_from_text(name, value)
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if tp in (int, float, str):
        try:
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected {tp.__name__}, got {value!r}") from None
    return value


def from_dict(cls: type[C], data: dict[str, Any], *, source: str = "config") -> C:
    """Build a dataclass from a plain dict; unknown keys are an error naming the valid ones."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(unknown)}; valid keys are {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(k, hints[k], v) for k, v in data.items()}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        choices = f.metadata.get("choices")
        if choices and f.name in kwargs and kwargs[f.name] not in choices:
            flag = "--" + f.name.replace("_", "-")
            raise ConfigError(f"{flag} {kwargs[f.name]!r} is unknown; use one of {', '.join(choices)}")
    return cls(**kwargs)


def load_config(
    cls: type[C], config_file: str | Path | None, overrides: dict[str, Any], *, given: str = "flags"
) -> C:
    """Merge defaults < YAML file < overrides (flags the user actually gave; None means not given);
    ``given`` names the overrides in an error (flags, or the API's keyword arguments). Checks types and
    choices only: the stage's runner calls ``cfg.validate()``, so a partial config loads.

    YAML keys may use dashes or underscores (``student-size`` or ``student_size``).
    """
    merged: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}".splitlines()[0]) from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values")
        merged.update({str(k).replace("-", "_"): v for k, v in loaded.items()})
    merged.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(cls, merged, source=str(config_file or given))


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain JSON-able dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically), URLs redacted (`cospress.utils.redact_config`):
    no credentials or signed-URL query strings in the file."""
    text = yaml.safe_dump(redact_config(to_dict(cfg)), sort_keys=False)
    atomic_write_bytes(path, text.encode())
