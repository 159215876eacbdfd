"""The store's identity and manifest: the identity, the manifest built from commits (the records'
paths are the layout object's, `cospress.store.records.NEW` / `StorePaths`; no alias here).

Everything a writer and a reader must agree on lives here, in `cospress.store.layout` (row and array
shapes) and in `cospress.store.schema` (version and checks); docs/store-format.md describes the same
format in prose. See that file for the meaning of every field.
"""

from __future__ import annotations

import datetime as _dt
import json
from typing import Any

from cospress.errors import StoreError
from cospress.store.fidelity import combine
from cospress.store.layout import StoreLayout
from cospress.store.schema import FORMAT_NAME, SCHEMA_VERSION, shorten
from cospress.utils import keys_sha256, redact_config

# Human names for identity fields, used in mismatch errors.
FIELD_LABELS = {
    "teacher": "teacher fingerprint",
    "view_policy": "view policy",
    "policy_fingerprint": "view policy fingerprint",
    "k": "K (random views per image)",
    "center_view": "centre view",
    "seed": "seed",
    "row_order": "row order",
    "decode": "decode path",
    "source": "source keys",
    "param_names": "view parameter names",
    "class_names": "class names",
    "shard_size": "shard size",
    "num_rows": "number of rows",
    "num_views": "number of views",
    "dim": "teacher dim",
    "num_tokens": "number of tokens",
    "num_params": "number of view parameters",
    "tokens": "tokens kept",
    "token_codec": "token codec",
    "dtypes": "dtypes",
    "shapes": "shapes",
    "schema_version": "schema version",
    "format": "format",
}


def shard_file_key(name: str, shard: int, ndim: int) -> str:
    """Path of a shard file relative to the store root (default chunk key encoding, "/")."""
    return "/".join([name, "c", str(shard)] + ["0"] * (ndim - 1))


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _field_values(name: str, old: Any, new: Any) -> tuple[Any, Any]:
    """The values that matter for comparing one identity field (e.g. the teacher's fingerprint)."""
    if name in ("decode", "class_names") and (old is None or new is None):
        return None, None  # a store written before the field was recorded: not compared
    if name == "schema_version":  # a newer MINOR reads, resumes and appends the same store
        return str(old).split(".")[0], str(new).split(".")[0]
    if name == "token_codec":  # a store written before codecs existed keeps fp16 tokens
        return _codec_text(old), _codec_text(new)
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


def _codec_text(codec: Any) -> str:
    """``fp16``, ``int8`` or ``pca:K (projection <sha256 prefix>)``."""
    codec = codec or {"name": "fp16"}
    if codec.get("name") != "pca":
        return str(codec.get("name"))
    return f"pca:{codec.get('components')} (projection {str(codec.get('projection_sha256'))[:12]})"


def identity_diff(old: dict, new: dict) -> list[str]:
    """Human descriptions of the identity fields that differ between two identities (another token
    codec is named once: the dtypes and shapes it implies are left out)."""
    out = []
    codec_differs = _field_values("token_codec", old.get("token_codec"), new.get("token_codec"))
    skip = {"dtypes", "shapes"} if codec_differs[0] != codec_differs[1] else set()
    for name in sorted(set(old) | set(new), key=lambda n: (n not in FIELD_LABELS, n)):
        if name in skip:
            continue
        a, b = _field_values(name, old.get(name), new.get(name))
        if a != b:
            label = FIELD_LABELS.get(name, name)
            out.append(f"{label} (store: {shorten(a)}, this run: {shorten(b)})")
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
    precision: str | None = None,
    decode: str | None = None,
    token_codec: dict | None = None,
) -> dict:
    """The run part of a store identity: what makes two extractions the same run.

    ``teacher`` is ``FeatureModel.describe()`` (with ``fingerprint``), ``view_policy`` is
    ``ViewPolicy.to_dict()``, ``source`` is ``Source.describe()`` (with ``keys_sha256``), ``k`` the
    views per image extracted, ``precision`` the teacher's autocast dtype and ``decode`` the resolved
    decode path (``cpu``: PIL in workers, ``device:cuda``: nvjpeg, ``device:cpu``); stage 1 records
    both, so a resume with another decode is refused rather than mixing two decoders in one store.
    ``token_codec`` is `cospress.store.projection.codec_entry` (default fp16). `full_identity` adds
    the layout fields.
    """
    # Keys in the order stage 1 has always written them, so identity files stay byte-identical.
    identity: dict[str, Any] = {
        "teacher": dict(teacher),
        "center_view": bool(center_view),
        "seed": int(seed),
        "source": dict(source),
        "param_names": [str(p) for p in param_names],
    }
    if precision is not None:
        identity["precision"] = str(precision)
    if decode is not None:
        identity["decode"] = str(decode)
    identity["view_policy"] = dict(view_policy)
    identity["policy_fingerprint"] = str(policy_fingerprint)
    identity["k"] = int(k)
    if token_codec is not None:
        identity["token_codec"] = dict(token_codec)
    if source.get("class_names") is not None:  # schema 2.1: label i is class_names[i]
        identity["class_names"] = [str(n) for n in source["class_names"]]
    return identity


def class_names(doc: dict) -> list[str] | None:
    """The class names of a store (label i is ``names[i]``), None when it has none: the identity's
    ``class_names`` (schema 2.1), else those of a single source recorded by an older store."""
    if "class_names" in doc:
        return doc["class_names"]
    src = doc.get("source") or {}
    return None if src.get("kind") in ("append", "merge") else src.get("class_names")


def combined_source(kind: str, spec: str | None, parts: list[dict], keys: list[str]) -> dict:
    """The source of a store made from others (``kind`` "append" or "merge"): its ``parts`` (the
    sources it was made from) and the count and hash of its real (non-padding) keys."""
    return {"kind": kind, "spec": spec, "count": len(keys), "keys_sha256": keys_sha256(keys), "parts": parts}


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
        "schema_version": identity.get("schema_version", SCHEMA_VERSION),
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
        "extra": redact_config(dict(extra or {})),
    }
    fidelity = combine([c.get("fidelity") for c in commits])
    if fidelity is not None:
        manifest["fidelity"] = fidelity
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
    "arrays",
    "metadata_sha256",
    "fidelity",
)


def full_identity(identity: dict, layout: StoreLayout, version: str = SCHEMA_VERSION) -> dict:
    """The run identity plus the layout fields (shapes, dtypes, ...): what the identity record holds
    (``version``: the schema of the store's layout, `StorePaths.schema_version`)."""
    run = redact_config(run_identity(identity))  # a source URL's credentials and query never stored
    codec = run.get("token_codec") or {"name": layout.token_codec}
    if codec.get("name") != layout.token_codec:
        raise StoreError(
            f"the identity's token codec {codec.get('name')} is not the layout's {layout.token_codec}"
        )
    run["token_codec"] = codec
    full = {"format": FORMAT_NAME, "schema_version": version, **run, **layout.to_manifest()}
    return json.loads(json.dumps(full))  # plain JSON types, as they will read back


def run_identity(manifest_or_identity: dict) -> dict:
    """The run part of an identity or a manifest (teacher, policy, K, seed, source, ...): no layout,
    no shard list; what `StoreWriter.open` takes to write a store of the same identity."""
    drop = set(LAYOUT_FIELDS) | set(MANIFEST_ONLY_FIELDS)
    return {k: v for k, v in manifest_or_identity.items() if k not in drop}
