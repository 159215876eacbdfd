"""Append to a complete store the keys of a source that it lacks, without rewriting a published shard.

New rows start at the next shard boundary (the old last shard is kept as it is, so padding rows
fill it up); the new identity file and the grown arrays' metadata are written atomically, and the
old manifest stays readable until the new one replaces it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cospress.errors import StoreError
from cospress.store import classes
from cospress.store import manifest as mf
from cospress.store.layout import StoreLayout
from cospress.store.reader import StoreReader
from cospress.store.records import detect, remove_record, write_record
from cospress.store.row_order import SHUFFLED, shuffled_rows, store_row_order
from cospress.store.writer import StoreWriter
from cospress.utils import atomic_write_bytes

log = logging.getLogger(__name__)


@dataclass
class AppendPlan:
    """What an append adds to a complete store.

    ``keys``/``labels`` are per row of the grown store (old rows, then ``""``/-1 padding up to the
    next shard boundary, then the new rows); ``positions`` int64 [num_rows] is the source index of
    each new row (-1 for old and padding rows).
    """

    path: Path
    identity: dict
    keys: list[str]
    labels: list[int]
    positions: np.ndarray
    old_rows: int
    old_shards: int
    first_new_row: int

    @property
    def added(self) -> int:
        return len(self.keys) - self.first_new_row

    @property
    def layout(self) -> StoreLayout:
        return StoreLayout.from_manifest(self.identity)


def _open_complete(p: Path) -> StoreReader:
    if not (p / detect(p).manifest).is_file():
        raise StoreError(
            f"--append needs a complete store at {p} (it has no manifest): finish it with the command "
            "that made it, or drop --append to create a new store"
        )
    return StoreReader(p)


def _check_same_run(p: Path, old: dict, identity: dict, layout: StoreLayout) -> None:
    """StoreError unless everything but the source and the row count matches the store's."""
    ignore = {"source", "num_rows", "shapes", "schema_version", "class_names"}
    want = mf.full_identity(identity, layout.with_rows(int(old["num_rows"])))
    have = {**mf.run_identity(old), **{k: old[k] for k in mf.LAYOUT_FIELDS}}
    diff = mf.identity_diff(
        {k: v for k, v in have.items() if k not in ignore}, {k: v for k, v in want.items() if k not in ignore}
    )
    if diff:
        raise StoreError(
            f"cannot append to {p}: it was made with other settings: {'; '.join(diff)}; "
            "append with the store's settings (cospress inspect shows them) or extract a new store"
        )


def _labels(
    reader: StoreReader, new_labels: list[int], source_info: dict, padding: int
) -> tuple[list[str] | None, list[int]]:
    """(class names, labels per row of the grown store): the new rows' labels mapped by class name
    into the store's numbering (`cospress.store.classes`); old rows keep theirs."""
    old_labels = np.asarray(reader.labels(), np.int64)
    new = np.asarray(new_labels, np.int64)
    spec = str(source_info.get("spec"))
    names, (_, table) = classes.union(
        [
            classes.Part(reader.display, mf.class_names(reader.manifest), bool((old_labels >= 0).any())),
            classes.Part(spec, source_info.get("class_names"), bool((new >= 0).any())),
        ]
    )
    labels = (
        [int(x) for x in old_labels] + [-1] * padding + [int(x) for x in classes.relabel(new, table, spec)]
    )
    return names, labels


def plan_append(
    path: str | os.PathLike,
    identity: dict,
    source_keys: list[str],
    source_labels: list[int],
    source_info: dict,
    layout: StoreLayout,
) -> AppendPlan:
    """Plan appending the keys of a source that a complete store lacks (keys it has are skipped).

    ``layout`` is this run's (its row count is not used). Everything in the identity but the source
    must match the store's, else StoreError names the fields. New rows start at the next shard
    boundary so no existing shard file is rewritten.
    """
    p = Path(path)
    reader = _open_complete(p)
    old = reader.manifest
    identity = {k: v for k, v in identity.items() if k != "row_order"}  # an append keeps the store's order
    if store_row_order(old) == SHUFFLED:
        identity["row_order"] = SHUFFLED
    _check_same_run(p, old, identity, layout)
    old_keys = reader.keys()
    pad_rows = {r for a, b in old.get("padding", []) for r in range(a, b)}
    real = [k for i, k in enumerate(old_keys) if i not in pad_rows]
    have_keys = set(real)
    new = [(i, k) for i, k in enumerate(source_keys) if k not in have_keys]
    if store_row_order(old) == SHUFFLED:  # the new rows in the store's order too
        new = [new[j] for j in shuffled_rows([k for _, k in new], int(identity["seed"]))]
    old_rows, old_shards = reader.num_rows, reader.num_shards
    start = old_shards * layout.shard_size if new else old_rows
    keys = old_keys + [""] * (start - old_rows) + [k for _, k in new]
    names, labels = _labels(reader, [int(source_labels[i]) for i, _ in new], source_info, start - old_rows)
    positions = np.full(len(keys), -1, np.int64)
    positions[start:] = [i for i, _ in new]
    version = detect(p).schema_version  # a legacy store keeps its layout (and a 1.x version)
    if not new:
        ident = mf.full_identity(mf.run_identity(old), layout.with_rows(old_rows), version)
        names = mf.class_names(old)
    else:
        real_all = real + [k for _, k in new]
        # the new source names every image only when it holds the old ones too (a grown folder)
        in_source = set(source_keys)
        spec = source_info.get("spec") if all(k in in_source for k in real) else None
        old_src = old.get("source") or {}
        parts = list(old_src.get("parts") or [old_src]) + [source_info]
        src = mf.combined_source("append", spec, parts, real_all)
        ident = mf.full_identity({**identity, "source": src}, layout.with_rows(len(keys)), version)
    if ident.get("class_names") != names:  # kept in place when unchanged (an undone append: same bytes)
        ident.pop("class_names", None)
        if names is not None:
            ident["class_names"] = names
    return AppendPlan(p, ident, keys, labels, positions, old_rows, old_shards, start)


def _resize_array(path: Path, name: str, num_rows: int) -> None:
    """Grow an array along axis 0 by rewriting its zarr.json atomically (shard files untouched)."""
    meta_path = path / name / "zarr.json"
    meta = json.loads(meta_path.read_text())
    if meta["shape"][0] != num_rows:
        meta["shape"][0] = num_rows
        # zarr's own formatting: shrinking back (an undone append) restores the file byte for byte
        atomic_write_bytes(meta_path, json.dumps(meta, indent=2).encode())


def open_append(plan: AppendPlan) -> StoreWriter:
    """Prepare a store for `plan`: new identity file and grown arrays (both atomic), the old
    manifest kept; returns a writer that writes only the new shards and never an old one."""
    p = plan.path
    paths = detect(p)
    stored = StoreWriter._read_identity(p, paths)
    if stored != plan.identity:
        # A different unfinished append may have left commits past the published shards: drop them.
        for entry in (p / paths.commits).iterdir():
            shard = paths.parse_commit(entry.name)
            if shard is not None and shard >= plan.old_shards:
                remove_record(p, paths.commit(shard), paths)
        write_record(p, paths.identity, plan.identity, paths)
    for name in plan.identity["shapes"]:
        _resize_array(p, name, plan.identity["num_rows"])
    writer = StoreWriter.open(p, plan.identity, plan.layout, create=False)
    writer.protected_shards = plan.old_shards
    log.info(
        "append to %s: %d new rows from row %d (%d padding rows)",
        p,
        plan.added,
        plan.first_new_row,
        plan.first_new_row - plan.old_rows,
    )
    return writer
