"""The store's schema version and the checks of an identity or a manifest read from disk.

Each check raises StoreError in one line naming the first problem and what to do about it.
"""

from __future__ import annotations

import re
from typing import Any

from cospress.errors import StoreError
from cospress.store.codecs import CODEC_NAMES
from cospress.store.guard import check_declared, safe_key
from cospress.store.layout import StoreLayout

# 1.1: appended stores (padding rows, counts.padding).
# 1.2: a source's keys_sha256 is `cospress.utils.keys_sha256` (newline-joined keys), like the
#      store's and the shards'; 1.1 sources hold the sha256 of the key list's JSON.
# 1.3: the manifest holds `metadata_sha256` (every zarr.json, the identity, the commits) and
#      `arrays` (each array's encoding); the identity may hold `decode` (the decode path).
# 1.4: token codecs: the identity's `token_codec` ({"name": fp16 | int8 | pca, ...}); int8 and pca
#      stores hold int8 `tokens` and a float16 `token_scale`, pca stores `token_projection/`.
# 2.0: the store's records are Zarr group nodes under cospress/ (`cospress.store.records`), so
#      zarr lists the store without warnings; 1.x stores (records as root files) are still read.
# 2.1: the identity's `class_names` (label i is class_names[i]); append and merge map labels by name.
SCHEMA_VERSION = "2.1"
READABLE_MAJORS = ("1", "2")
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
    """Refuse a store whose schema MAJOR this code does not read; a newer MINOR is readable."""
    got = str(version)
    if got.split(".")[0] not in READABLE_MAJORS:
        majors = " and ".join(f"{m}.x" for m in READABLE_MAJORS)
        raise StoreError(
            f"{where} has store schema version {got}; this cospress reads {majors} only: "
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
    _check_codec(doc)
    expected = StoreLayout.from_manifest(doc).to_manifest()
    if doc["shapes"] != expected["shapes"]:
        raise ValueError(f"'shapes' {shorten(doc['shapes'])} do not match the layout fields")
    if doc["dtypes"] != expected["dtypes"]:
        raise ValueError(f"'dtypes' {shorten(doc['dtypes'])} are not the store's dtypes")
    check_declared(doc)  # sizes bounded before a reader allocates anything


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
        files = entry.get("files", {})
        if not isinstance(files, dict) or not all(safe_key(f) for f in files.values()):
            raise ValueError(f"shards[{i}].'files' {shorten(files)} names a path outside the store")


def _is_int(v: Any, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _is_hex(v: Any) -> bool:
    return isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None


def _check_source(src: Any, where: str = "'source'") -> None:
    if not isinstance(src, dict):
        raise ValueError(f"{where} must be an object, got {type(src).__name__}")
    if src.get("spec") is not None and not isinstance(src["spec"], str):
        raise ValueError(f"{where}.'spec' must be a string or null")
    if "count" in src and not _is_int(src["count"]):
        raise ValueError(f"{where}.'count' must be an integer >= 0, got {shorten(src['count'])}")
    if "keys_sha256" in src and not isinstance(src["keys_sha256"], str):
        raise ValueError(f"{where}.'keys_sha256' must be a string")
    parts = src.get("parts", [])
    if not isinstance(parts, list):
        raise ValueError(f"{where}.'parts' must be a list")
    for i, part in enumerate(parts):
        _check_source(part, f"{where}.parts[{i}]")


def _check_teacher_grid(doc: dict) -> None:
    grid = doc["teacher"].get("grid")
    if grid is None:
        return
    ok = isinstance(grid, list) and len(grid) == 2 and all(_is_int(g, 1) for g in grid)
    if not ok or (doc["num_tokens"] > 0 and grid[0] * grid[1] != doc["num_tokens"]):
        raise ValueError(f"'teacher'.'grid' {shorten(grid)} is not [h, w] with h x w = num_tokens")


def _check_codec(doc: dict) -> None:
    codec = doc.get("token_codec", {"name": "fp16"})
    if not isinstance(codec, dict) or codec.get("name") not in CODEC_NAMES:
        raise ValueError(f"'token_codec' {shorten(codec)} is not one of {', '.join(CODEC_NAMES)}")
    if codec["name"] == "pca" and not (
        _is_int(codec.get("components"), 1) and codec["components"] <= doc["dim"]
        and _is_hex(codec.get("projection_sha256"))
    ):  # fmt: skip
        raise ValueError("'token_codec' pca needs 'components' (1 to dim) and a hex 'projection_sha256'")


def _check_run_fields(doc: dict) -> None:
    """The optional fields of an identity: ``source``, ``teacher.grid``, ``decode``."""
    if "source" in doc:
        _check_source(doc["source"])
    _check_teacher_grid(doc)
    if "decode" in doc and not isinstance(doc["decode"], str):
        raise ValueError("'decode' must be a string")
    names = doc.get("class_names")
    if names is not None and not (
        isinstance(names, list) and all(isinstance(n, str) for n in names) and len(set(names)) == len(names)
    ):
        raise ValueError("'class_names' must be a list of distinct strings or null")


def _check_manifest_extras(doc: dict) -> None:
    """``padding``, ``skipped`` and, from schema 1.3, ``metadata_sha256`` and ``arrays``."""
    n = doc["num_rows"]
    padding = doc.get("padding", [])
    if not isinstance(padding, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(_is_int(v) for v in p) and p[0] < p[1] <= n
        for p in padding
    ):
        raise ValueError(f"'padding' {shorten(padding)} must be a list of [start, stop] row ranges")
    skipped = doc.get("skipped", [])
    if not isinstance(skipped, list) or not all(
        isinstance(x, dict) and isinstance(x.get("key"), str) and isinstance(x.get("reason"), str)
        for x in skipped
    ):
        raise ValueError("'skipped' must be a list of {key, reason} strings")
    hashes = doc.get("metadata_sha256", {})
    if not isinstance(hashes, dict) or not all(isinstance(k, str) and _is_hex(h) for k, h in hashes.items()):
        raise ValueError("'metadata_sha256' must map file names to hex sha256s")
    outside = [k for k in hashes if not safe_key(k)]
    if outside:  # never read a file outside the store (`..`, an absolute path, /dev/zero)
        raise ValueError(f"'metadata_sha256' names {outside[0][:80]!r}, a path outside the store")
    arrays = doc.get("arrays")
    if arrays is not None and (
        not isinstance(arrays, dict)
        or set(arrays) != set(doc["shapes"])
        or not all(isinstance(a, dict) for a in arrays.values())
    ):
        raise ValueError("'arrays' must hold one object per array of 'shapes'")


def validate_identity(doc: Any, where: str) -> dict:
    """Check an identity (``cospress-store.json`` or an export sidecar): required keys, types, layout.

    Raises StoreError, one line, naming the first problem; returns ``doc``.
    """
    try:
        _check_fields(doc, _IDENTITY_SCHEMA, "")
        check_schema_version(doc["schema_version"], where)
        _check_layout(doc)
        _check_run_fields(doc)
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
        _check_run_fields(doc)
        _check_shards(doc)
        _check_manifest_extras(doc)
    except ValueError as e:
        raise StoreError(
            f"{where}: the manifest is malformed: {e}; re-upload or re-extract the store"
        ) from None
    return doc
