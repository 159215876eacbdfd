"""The store's layout, identity and manifest: names, shapes, versions, hashes and checks.

Everything a writer and a reader must agree on lives here; docs/store-format.md describes the same
format in prose. See that file for the meaning of every field.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from cospress.errors import StoreError

SCHEMA_VERSION = "1.0"
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


def build_manifest(identity: dict, commits: list[dict], extra: dict | None, version: str) -> dict:
    """The manifest of a complete store from its identity and its shard commits (in shard order)."""
    skipped = [s for c in commits for s in c["skipped"]]
    rows = sum(c["counts"]["rows"] for c in commits)
    valid = sum(c["counts"]["valid"] for c in commits)
    return {
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
        "counts": {"rows": rows, "valid": valid, "skipped": rows - valid, "shards": len(commits)},
        "cospress_version": version,
        "created": now_utc(),
        "extra": dict(extra or {}),
    }


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
