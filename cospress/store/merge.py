"""Merge complete stores of one teacher and view policy over disjoint data, without recomputing.

``merge_stores([A, B], C)`` copies A's rows, then B's, shard by shard into a new store C (read by
row, so inputs may be remote and may have other shard sizes). Everything in the identity but the
source must match; C's source lists both inputs and hashes C's keys. A key present in two inputs
is refused: merged stores are over disjoint data. Tokens are copied as stored, so only stores of one
token codec (and, for pca, one projection) merge, and the merged store holds the same bytes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import cospress
from cospress.errors import StoreError
from cospress.store import classes
from cospress.store import manifest as mf
from cospress.store.reader import StoreReader
from cospress.store.writer import StoreWriter

log = logging.getLogger(__name__)

# Layout fields that must agree for rows to be copied as they are (the row count and shard size may differ).
_SAME_LAYOUT = ("num_views", "dim", "num_tokens", "num_params", "tokens")


def real_rows(reader: StoreReader) -> np.ndarray:
    """int64 rows of a store that hold an input (valid or skipped), i.e. without append padding."""
    keep = np.ones(reader.num_rows, bool)
    for a, b in reader.manifest.get("padding", []):
        keep[a:b] = False
    return np.flatnonzero(keep).astype(np.int64)


def merge_key(manifest: dict) -> dict:
    """What must be equal for two stores to merge: the identity without source and row layout."""
    out = {k: v for k, v in mf.run_identity(manifest).items() if k not in ("source", "class_names")}
    out.update({k: manifest[k] for k in _SAME_LAYOUT})
    return out


def _merged_source(readers: list[StoreReader], keys: list[str]) -> dict:
    parts: list[dict] = []
    for r in readers:
        src = r.manifest.get("source") or {}
        parts.extend(src.get("parts") or [src] if src.get("kind") == "merge" else [src])
    specs = {p.get("spec") for p in parts}
    spec = specs.pop() if len(specs) == 1 else None  # one source when all parts share it
    return mf.combined_source("merge", spec, parts, keys)


def _check_inputs(readers: list[StoreReader], out: Path) -> None:
    first = readers[0]
    for r in readers[1:]:
        diff = mf.identity_diff(merge_key(first.manifest), merge_key(r.manifest))
        if diff:
            text = "; ".join(
                d.replace("(store: ", "(first: ").replace(", this run: ", ", other: ") for d in diff
            )
            raise StoreError(
                f"cannot merge {first.display} and {r.display}: they differ in {text}; only stores of the "
                "same teacher, view policy, K, seed and tokens merge"
            )
    for r in readers:
        if "://" not in r.url and Path(r.url).resolve() == out.resolve():
            raise StoreError(f"--out {out} is one of the inputs; write the merged store to a new path")


def _check_disjoint(readers: list[StoreReader], rows: list[np.ndarray]) -> list[str]:
    seen: dict[str, int] = {}
    keys: list[str] = []
    for i, (r, rr) in enumerate(zip(readers, rows, strict=True)):
        all_keys = r.keys()
        for row in rr:
            k = all_keys[int(row)]
            if k in seen:
                other = readers[seen[k]].display
                raise StoreError(
                    f"cannot merge: key {k[:80]!r} is in both {other} and {r.display}; merge stores over "
                    "disjoint data (extract the missing images with extract-teacher --append instead)"
                )
            seen[k] = i
            keys.append(k)
    return keys


def _class_names(readers: list[StoreReader], rows: list[np.ndarray]) -> tuple[list[str] | None, list]:
    """The merged store's class names and, per input, its label table (`cospress.store.classes`)."""
    parts = [
        classes.Part(r.display, mf.class_names(r.manifest), bool((np.asarray(r.labels())[rr] >= 0).any()))
        for r, rr in zip(readers, rows, strict=True)
    ]
    return classes.union(parts)


def _copy_shard(
    writer: StoreWriter, shard: int, readers: list[StoreReader], which: np.ndarray, where: np.ndarray,
    reasons: dict[str, str], tables: list,
) -> None:  # fmt: skip
    """Write one shard of the merged store: row i comes from row ``where[i]`` of input ``which[i]``,
    its label mapped through ``tables[which[i]]`` (by class name)."""
    start, stop = writer.shard_rows(shard)
    tokens = writer.layout.tokens
    lossy = tokens and writer.layout.token_codec != "fp16"
    parts = []
    for i in np.unique(which[start:stop]):
        sel = where[start:stop][which[start:stop] == i]
        part = readers[int(i)].read_rows(sel, tokens=tokens, raw=True)  # tokens copied as stored
        part["labels"] = classes.relabel(part["labels"], tables[int(i)], readers[int(i)].display)
        parts.append(part)
    data = {name: np.concatenate([p[name] for p in parts]) for name in ("cls", "views", "labels", "valid")}
    keys = [k for p in parts for k in p["keys"]]
    skipped = [
        {"key": k, "reason": reasons.get(k, "skipped in the input store")}
        for k, ok in zip(keys, data["valid"], strict=True)
        if not ok
    ]
    writer.write_shard(
        shard,
        cls=data["cls"],
        tokens=np.concatenate([p["tokens"] for p in parts]) if tokens else None,
        token_scale=np.concatenate([p["token_scale"] for p in parts]) if lossy else None,
        views=data["views"],
        keys=keys,
        labels=data["labels"],
        valid=data["valid"].astype(np.uint8),
        skipped=skipped,
    )


def merge_stores(
    inputs: Sequence[str],
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    shard_size: int | None = None,
    cache_dir: str | None = None,
    storage_options: dict | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Write store ``out`` = the rows of ``inputs`` in order (append padding left out); returns its manifest.

    ``shard_size`` defaults to the first input's. Rerunning the same merge resumes: committed
    shards of ``out`` are kept. ``progress(done_rows, total_rows)`` is called after each shard.
    """
    if len(inputs) < 2:
        raise StoreError("merge needs at least two stores")
    readers = [StoreReader(u, cache_dir=cache_dir, storage_options=storage_options) for u in inputs]
    out = Path(out)
    _check_inputs(readers, out)
    rows = [real_rows(r) for r in readers]
    keys = _check_disjoint(readers, rows)
    first = readers[0]
    layout = dataclasses.replace(
        first.layout, num_rows=len(keys), shard_size=int(shard_size or first.shard_size)
    )
    names, tables = _class_names(readers, rows)
    identity = {**mf.run_identity(first.manifest), "source": _merged_source(readers, keys)}
    identity.pop("class_names", None)
    if names is not None:
        identity["class_names"] = names
    writer = StoreWriter.open(
        out, identity, layout, overwrite=overwrite, create=True, projection=first.projection
    )
    which = np.concatenate([np.full(len(r), i, np.int64) for i, r in enumerate(rows)])
    where = np.concatenate(rows)
    reasons = {s["key"]: s["reason"] for r in readers for s in r.manifest.get("skipped", [])}
    done = writer.committed_shards()
    for shard in range(writer.num_shards):
        if shard not in done:
            _copy_shard(writer, shard, readers, which, where, reasons, tables)
        if progress is not None:
            progress(writer.shard_rows(shard)[1], len(keys))
    extra = {
        "merged_from": [
            {"url": r.display, "rows": len(rr), "keys_sha256": r.manifest.get("keys_sha256")}
            for r, rr in zip(readers, rows, strict=True)
        ],
        "cospress_version": cospress.__version__,
    }
    manifest = writer.finalize(extra=extra)
    log.info("merged %d stores into %s (%d rows)", len(readers), out, len(keys))
    return manifest
