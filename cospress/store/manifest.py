"""The store's layout, identity and manifest: names, shapes, versions, hashes and checks.

Everything a writer and a reader must agree on lives here; docs/store-format.md describes the same
format in prose. See that file for the meaning of every field.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from cospress.errors import StoreError

SCHEMA_VERSION = "1.1"  # 1.1: appended stores (padding rows, counts.padding)
FORMAT_NAME = "cospress-store"
IDENTITY_FILE = "cospress-store.json"
MANIFEST_FILE = "manifest.json"
COMMITS_DIR = "commits"

ARRAY_NAMES = ("cls", "tokens", "views", "keys", "labels", "valid")
DTYPES = {
    "cls": "float16",
    "tokens": "float16",
    "views": "float32",
    "keys": "str",
    "labels": "int64",
    "valid": "uint8",
}
FILL_VALUES: dict[str, Any] = {"cls": 0, "tokens": 0, "views": 0, "keys": "", "labels": -1, "valid": 0}
# Fields of the identity a run may set; the writer adds the layout fields itself.
RUN_FIELDS = (
    "teacher",
    "view_policy",
    "policy_fingerprint",
    "k",
    "center_view",
    "seed",
    "source",
    "param_names",
)
# Human names for identity fields, used in mismatch errors.
FIELD_LABELS = {
    "teacher": "teacher fingerprint",
    "view_policy": "view policy",
    "policy_fingerprint": "view policy fingerprint",
    "k": "K (random views per image)",
    "center_view": "centre view",
    "seed": "seed",
    "source": "source keys",
    "param_names": "view parameter names",
    "shard_size": "shard size",
    "num_rows": "number of rows",
    "num_views": "number of views",
    "dim": "teacher dim",
    "num_tokens": "number of tokens",
    "num_params": "number of view parameters",
    "tokens": "tokens kept",
    "dtypes": "dtypes",
    "shapes": "shapes",
    "schema_version": "schema version",
    "format": "format",
}


def array_shapes(
    num_rows: int, num_views: int, dim: int, num_tokens: int, num_params: int, tokens: bool
) -> dict[str, list[int]]:
    """Shape of every array of a store (``tokens`` only when kept)."""
    shapes = {
        "cls": [num_rows, num_views, dim],
        "views": [num_rows, num_views, num_params],
        "keys": [num_rows],
        "labels": [num_rows],
        "valid": [num_rows],
    }
    if tokens:
        shapes["tokens"] = [num_rows, num_views, num_tokens, dim]
    return {name: shapes[name] for name in ARRAY_NAMES if name in shapes}


def array_chunks(name: str, shape: list[int], shard_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(inner chunk, shard) shapes of one array: shards of ``shard_size`` rows along axis 0.

    Row arrays get one inner chunk per row so one row can be fetched by byte range; ``tokens``
    gets one inner chunk per (row, view) so reading a subset of views fetches only those views;
    the 1-D arrays (keys, labels, valid) get one inner chunk per shard.
    """
    shard = (shard_size, *shape[1:])
    if name == "tokens":
        chunk = (1, 1, *shape[2:])
    elif len(shape) > 1:
        chunk = (1, *shape[1:])
    else:
        chunk = (shard_size,)
    return chunk, shard


def estimate_store_bytes(
    num_rows: int, num_views: int, dim: int, num_tokens: int, num_params: int, tokens: bool
) -> int:
    """Uncompressed bytes of a store: ``N x V x (1 + T) x Dt x 2`` (float16) + views, keys, labels.

    Lossless compression gains only ~1.15x on float16 embeddings, so this is close to the size
    on disk. Keys are counted at 32 bytes each.
    """
    per_row_feat = num_views * (1 + (num_tokens if tokens else 0)) * dim * 2
    per_row_other = num_views * num_params * 4 + 8 + 1 + 32
    return int(num_rows) * (per_row_feat + per_row_other)


def shard_file_key(name: str, shard: int, ndim: int) -> str:
    """Path of a shard file relative to the store root (default chunk key encoding, "/")."""
    return "/".join([name, "c", str(shard)] + ["0"] * (ndim - 1))


def commit_key(shard: int) -> str:
    return f"{COMMITS_DIR}/shard-{shard:06d}.json"


_COMMIT_RE = re.compile(r"^shard-(\d{6,})\.json$")


def parse_commit_name(name: str) -> int | None:
    m = _COMMIT_RE.match(name)
    return int(m.group(1)) if m else None


def keys_sha256(keys: list[str]) -> str:
    """Hash of a list of keys, in order (newline-joined UTF-8)."""
    h = hashlib.sha256()
    for k in keys:
        h.update(k.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def redact_url(url: str) -> str:
    """``url`` without credentials (``user:password@``) and without query string or fragment."""
    s = str(url)
    if "://" not in s:
        return s
    parts = urlsplit(s)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


_URL_CREDENTIALS = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@")
_URL_QUERY = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s?#'\"]*)[?#][^\s'\"]*")


def redact_text(text: str) -> str:
    """``text`` with credentials and query strings removed from every URL in it (for errors and logs)."""
    return _URL_QUERY.sub(r"\1", _URL_CREDENTIALS.sub(r"\1", str(text)))


def check_schema_version(version: Any, where: str) -> None:
    """Refuse a store whose schema MAJOR differs from this code's; a newer MINOR is readable."""
    major = SCHEMA_VERSION.split(".")[0]
    got = str(version)
    if got.split(".")[0] != major:
        raise StoreError(
            f"{where} has store schema version {got}; this cospress reads {major}.x only: "
            "use a cospress release that matches, or re-extract the store"
        )


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _field_values(name: str, old: Any, new: Any) -> tuple[Any, Any]:
    """The values that matter for comparing one identity field (e.g. the teacher's fingerprint)."""
    if name == "teacher" and isinstance(old, dict) and isinstance(new, dict):
        if "fingerprint" in old and "fingerprint" in new:
            return old["fingerprint"], new["fingerprint"]
    if name == "source" and isinstance(old, dict) and isinstance(new, dict):
        if "keys_sha256" in old and "keys_sha256" in new:
            return (
                f"{old.get('count')} keys, sha256 {str(old['keys_sha256'])[:12]}",
                f"{new.get('count')} keys, sha256 {str(new['keys_sha256'])[:12]}",
            )
    return old, new


def identity_diff(old: dict, new: dict) -> list[str]:
    """Human descriptions of the identity fields that differ between two identities."""
    out = []
    for name in sorted(set(old) | set(new), key=lambda n: (n not in FIELD_LABELS, n)):
        a, b = _field_values(name, old.get(name), new.get(name))
        if a != b:
            label = FIELD_LABELS.get(name, name)
            out.append(f"{label} (store: {_short(a)}, this run: {_short(b)})")
    return out


def make_identity(
    *,
    teacher: dict,
    view_policy: dict,
    policy_fingerprint: str,
    k: int,
    center_view: bool,
    seed: int,
    source: dict,
    param_names: list[str] | tuple[str, ...],
) -> dict:
    """The run part of a store identity, as `StoreWriter.open` expects it.

    ``teacher`` is ``FeatureModel.describe()`` (with ``fingerprint``), ``view_policy`` is
    ``ViewPolicy.to_dict()``, ``source`` is ``Source.describe()`` (with ``keys_sha256``).
    """
    return {
        "teacher": dict(teacher),
        "view_policy": dict(view_policy),
        "policy_fingerprint": str(policy_fingerprint),
        "k": int(k),
        "center_view": bool(center_view),
        "seed": int(seed),
        "source": dict(source),
        "param_names": [str(p) for p in param_names],
    }


def normalize_identity(identity: dict) -> dict:
    """The run identity with the canonical field names of `make_identity`.

    Accepts the aliases ``policy`` = {..., "fingerprint"} (for ``view_policy`` + ``policy_fingerprint``)
    and ``views`` (an int: for ``k``), so every manifest has ``k``, ``view_policy`` and
    ``policy_fingerprint`` whatever the caller passed.
    """
    out = dict(identity)
    if "view_policy" not in out and isinstance(out.get("policy"), dict):
        policy = dict(out.pop("policy"))
        fingerprint = policy.pop("fingerprint", None)
        out["view_policy"] = policy
        if fingerprint is not None:
            out.setdefault("policy_fingerprint", fingerprint)
    if "k" not in out and isinstance(out.get("views"), int) and not isinstance(out.get("views"), bool):
        out["k"] = out.pop("views")
    return out


def commit_padding(commit: dict, shard_size: int, num_rows: int) -> list[int] | None:
    """``[start, stop)`` of the padding rows after a commit's rows inside its shard, or None.

    Only an appended store has them: the old last (short) shard is never rewritten, so rows after it
    up to the shard boundary hold fill values (``valid = 0``, empty key) and belong to no input.
    """
    stop = int(commit["rows"][1])
    end = min((int(commit["shard"]) + 1) * shard_size, num_rows)
    return [stop, end] if end > stop else None


def build_manifest(identity: dict, commits: list[dict], extra: dict | None, version: str) -> dict:
    """The manifest of a complete store from its identity and its shard commits (in shard order)."""
    skipped = [s for c in commits for s in c["skipped"]]
    rows = sum(c["counts"]["rows"] for c in commits)
    valid = sum(c["counts"]["valid"] for c in commits)
    shard_size, num_rows = int(identity["shard_size"]), int(identity["num_rows"])
    padding = [p for c in commits if (p := commit_padding(c, shard_size, num_rows))]
    counts = {"rows": rows, "valid": valid, "skipped": rows - valid, "shards": len(commits)}
    manifest = {
        **identity,
        "schema_version": SCHEMA_VERSION,
        "format": FORMAT_NAME,
        "shards": [
            {
                "shard": c["shard"],
                "rows": c["rows"],
                "files": c["files"],
                "sha256": c["sha256"],
                "keys_sha256": c["keys_sha256"],
                "counts": c["counts"],
            }
            for c in commits
        ],
        "skipped": skipped,
        "counts": counts,
        "cospress_version": version,
        "created": now_utc(),
        "extra": dict(extra or {}),
    }
    if padding:
        counts["padding"] = sum(b - a for a, b in padding)
        counts["rows"] = rows + counts["padding"]
        manifest["padding"] = padding
    return manifest


def format_ranges(ids: list[int], limit: int = 20) -> str:
    """Compact text for a sorted id list: ``0-3, 7, 9-12``."""
    parts: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    if len(parts) > limit:
        parts = parts[:limit] + [f"... ({len(ids)} in all)"]
    return ", ".join(parts)


# ---- identity helpers -----------------------------------------------------------------------------
LAYOUT_FIELDS = (
    "format",
    "schema_version",
    "num_rows",
    "shard_size",
    "num_views",
    "dim",
    "num_tokens",
    "num_params",
    "tokens",
    "shapes",
    "dtypes",
)
MANIFEST_ONLY_FIELDS = (
    "shards",
    "skipped",
    "counts",
    "keys_sha256",
    "cospress_version",
    "created",
    "extra",
    "padding",
)


def full_identity(
    identity: dict,
    *,
    num_rows: int,
    shard_size: int,
    num_views: int,
    dim: int,
    num_tokens: int,
    num_params: int,
    tokens: bool,
) -> dict:
    """The run identity plus the layout fields (shapes, dtypes, ...): what ``cospress-store.json`` holds."""
    shapes = array_shapes(num_rows, num_views, dim, num_tokens, num_params, tokens)
    full = {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        **normalize_identity(run_identity(identity)),
        "num_rows": int(num_rows),
        "shard_size": int(shard_size),
        "num_views": int(num_views),
        "dim": int(dim),
        "num_tokens": int(num_tokens),
        "num_params": int(num_params),
        "tokens": bool(tokens),
        "shapes": shapes,
        "dtypes": {n: DTYPES[n] for n in shapes},
    }
    return json.loads(json.dumps(full))  # plain JSON types, as they will read back


def run_identity(manifest_or_identity: dict) -> dict:
    """The run part of an identity or a manifest (teacher, policy, K, seed, source, ...): no layout,
    no shard list; what `StoreWriter.open` takes to write a store of the same identity."""
    drop = set(LAYOUT_FIELDS) | set(MANIFEST_ONLY_FIELDS)
    return {k: v for k, v in manifest_or_identity.items() if k not in drop}


def layout_of(manifest: dict) -> dict[str, Any]:
    """The layout keyword arguments of `StoreWriter.open` for a store like ``manifest``."""
    return {
        "num_rows": int(manifest["num_rows"]),
        "shard_size": int(manifest["shard_size"]),
        "num_views": int(manifest["num_views"]),
        "dim": int(manifest["dim"]),
        "num_tokens": int(manifest["num_tokens"]),
        "num_params": int(manifest["num_params"]),
        "tokens": bool(manifest["tokens"]),
    }


# ---- schema validation ----------------------------------------------------------------------------
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
    expected = array_shapes(
        doc["num_rows"], doc["num_views"], doc["dim"], doc["num_tokens"], doc["num_params"], doc["tokens"]
    )
    if doc["shapes"] != expected:
        raise ValueError(f"'shapes' {_short(doc['shapes'])} do not match the layout fields")
    if doc["dtypes"] != {n: DTYPES[n] for n in expected}:
        raise ValueError(f"'dtypes' {_short(doc['dtypes'])} are not the store's dtypes")


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
                f"shards[{i}] has shard {entry['shard']} rows {_short(rows)}: not shard {i} of the layout"
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
