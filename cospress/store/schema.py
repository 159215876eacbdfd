"""The store's schema version and the checks of an identity or a manifest read from disk.

Each check raises StoreError in one line naming the first problem and what to do about it.
"""

from __future__ import annotations

import re
from typing import Any

from cospress.errors import StoreError
from cospress.store.layout import StoreLayout

# 1.1: appended stores (padding rows, counts.padding).
# 1.2: a source's keys_sha256 is `cospress.utils.keys_sha256` (newline-joined keys), like the
#      store's and the shards'; 1.1 sources hold the sha256 of the key list's JSON.
SCHEMA_VERSION = "1.2"
FORMAT_NAME = "cospress-store"

_INT = (int,)
_IDENTITY_SCHEMA: dict[str, Any] = {
    "format": str,
    "schema_version": str,
    "teacher": dict,
    "num_rows": _INT,
    "shard_size": _INT,
    "num_views": _INT,
    "dim": _INT,
    "num_tokens": _INT,
    "num_params": _INT,
    "tokens": bool,
    "shapes": dict,
    "dtypes": dict,
}
_MANIFEST_SCHEMA: dict[str, Any] = {**_IDENTITY_SCHEMA, "shards": list, "counts": dict}
_SHARD_SCHEMA: dict[str, Any] = {"shard": _INT, "rows": list, "sha256": dict}


def shorten(value: Any) -> str:
    """``str(value)`` cut to 40 characters, for one-line errors."""
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_schema_version(version: Any, where: str) -> None:
    """Refuse a store whose schema MAJOR differs from this code's; a newer MINOR is readable."""
    major = SCHEMA_VERSION.split(".")[0]
    got = str(version)
    if got.split(".")[0] != major:
        raise StoreError(
            f"{where} has store schema version {got}; this cospress reads {major}.x only: "
            "use a cospress release that matches, or re-extract the store"
        )


def _type_name(t: Any) -> str:
    types = t if isinstance(t, tuple) else (t,)
    return " or ".join(
        {int: "integer", str: "string", bool: "boolean", dict: "object", list: "list"}[x] for x in types
    )


def _check_fields(obj: Any, schema: dict[str, Any], where: str) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{where or 'the document'} is not a JSON object")
    for name, typ in schema.items():
        if name not in obj:
            raise ValueError(f"required key {where}{name!r} is missing")
        value = obj[name]
        types = typ if isinstance(typ, tuple) else (typ,)
        bad_bool = isinstance(value, bool) and bool not in types
        if bad_bool or not isinstance(value, types):
            raise ValueError(f"{where}{name!r} must be {_type_name(typ)}, got {type(value).__name__}")


def _check_layout(doc: dict) -> None:
    if doc["format"] != FORMAT_NAME:
        raise ValueError(f"'format' is {doc['format'][:40]!r}, not {FORMAT_NAME!r}")
    for name in ("num_rows", "shard_size", "num_views", "dim", "num_params"):
        if doc[name] < 1:
            raise ValueError(f"{name!r} must be at least 1, got {doc[name]}")
    if doc["num_tokens"] < 0:
        raise ValueError(f"'num_tokens' must be 0 or more, got {doc['num_tokens']}")
    expected = StoreLayout.from_manifest(doc).to_manifest()
    if doc["shapes"] != expected["shapes"]:
        raise ValueError(f"'shapes' {shorten(doc['shapes'])} do not match the layout fields")
    if doc["dtypes"] != expected["dtypes"]:
        raise ValueError(f"'dtypes' {shorten(doc['dtypes'])} are not the store's dtypes")


def _check_shards(doc: dict) -> None:
    size, n = doc["shard_size"], doc["num_rows"]
    num_shards = (n + size - 1) // size
    if len(doc["shards"]) != num_shards:
        raise ValueError(f"'shards' lists {len(doc['shards'])} shards, the layout needs {num_shards}")
    for i, entry in enumerate(doc["shards"]):
        _check_fields(entry, _SHARD_SCHEMA, f"shards[{i}].")
        rows = entry["rows"]
        ok = (
            entry["shard"] == i
            and len(rows) == 2
            and all(isinstance(r, int) and not isinstance(r, bool) for r in rows)
            and rows[0] == i * size
            and rows[0] < rows[1] <= min((i + 1) * size, n)
        )
        if not ok:
            raise ValueError(
                f"shards[{i}] has shard {entry['shard']} rows {shorten(rows)}: not shard {i} of the layout"
            )
        if set(entry["sha256"]) != set(doc["shapes"]) or not all(
            isinstance(h, str) and re.fullmatch(r"[0-9a-f]{64}", h) for h in entry["sha256"].values()
        ):
            raise ValueError(f"shards[{i}].'sha256' must hold one hex sha256 per array")


def validate_identity(doc: Any, where: str) -> dict:
    """Check an identity (``cospress-store.json`` or an export sidecar): required keys, types, layout.

    Raises StoreError, one line, naming the first problem; returns ``doc``.
    """
    try:
        _check_fields(doc, _IDENTITY_SCHEMA, "")
        check_schema_version(doc["schema_version"], where)
        _check_layout(doc)
    except ValueError as e:
        raise StoreError(f"{where} is malformed: {e}; re-upload or re-extract the store") from None
    return doc


def validate_manifest(doc: Any, where: str) -> dict:
    """Check a manifest: required keys and their types, layout, one shard entry per shard.

    Raises StoreError (one line) naming the first problem; an unknown schema major is reported as
    such. Returns ``doc``.
    """
    if isinstance(doc, dict) and "schema_version" in doc:
        check_schema_version(doc["schema_version"], where)
    try:
        _check_fields(doc, _MANIFEST_SCHEMA, "")
        _check_layout(doc)
        _check_shards(doc)
    except ValueError as e:
        raise StoreError(
            f"{where}/manifest.json is malformed: {e}; re-upload or re-extract the store"
        ) from None
    return doc
