"""View extensions: more views of every row of a store, added without rewriting it.

``extract-teacher --add-views N --to STORE`` writes views K .. K+N-1 of every row (K = the random
views the store and its extensions hold so far) as a complete store of its own under
``STORE/extensions/views-<K>-<K+N>/``: the same rows, keys, shards, teacher, view policy, seed and
token codec, with the views drawn by the keyed RNG at indices K .. K+N-1, so they are exactly the
views a K+N store of the same seed holds. When it is complete its entry is added to the index
record ``cospress/extensions/zarr.json`` (written last); the base store's own files are never touched.

A reader (:class:`~cospress.store.reader.StoreReader`) opens the extensions listed in the index and
shows base + extensions as one store of ``stored_views`` = K + N (+ the centre view) views: combined
view ``j`` is base view ``j`` for j < K, view ``j - first`` of the extension that starts at
``first``, and the centre view (base index K) last, as in a K+N store with a centre view.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cospress.errors import StoreError
from cospress.store import records
from cospress.store.records import NEW

INDEX = "cospress/extensions/zarr.json"
FOLDER = "extensions"
# identity fields an extension must share with its store (the name is what a refusal shows)
RUN_FIELDS = (
    ("teacher", lambda d: (d.get("teacher") or {}).get("fingerprint")),
    ("view policy", lambda d: d.get("policy_fingerprint")),
    ("seed", lambda d: d.get("seed")),
    ("key set", lambda d: ((d.get("source") or {}).get("keys_sha256"), (d.get("source") or {}).get("count"))),
    ("view params", lambda d: d.get("param_names")),
    ("row order", lambda d: d.get("row_order", "source")),
)
LAYOUT_FIELDS = (
    ("token codec", lambda d: ((d.get("token_codec") or {}).get("name", "fp16"), d.get("tokens"))),
    ("rows", lambda d: (d.get("num_rows"), d.get("shard_size"))),
)


@dataclass
class ViewExtension:
    """One extension: its folder (relative to the store), its first view index and its view count."""

    path: str
    first_view: int
    views: int
    manifest_sha256: str = ""
    reader: Any = None  # a StoreReader of the extension, opened by the base reader

    def entry(self) -> dict[str, Any]:
        return {"path": self.path, "first_view": self.first_view, "views": self.views,
                "manifest_sha256": self.manifest_sha256}  # fmt: skip


def folder_name(first: int, views: int) -> str:
    return f"{FOLDER}/views-{first:04d}-{first + views:04d}"


def parse_index(doc: Any, where: str) -> list[ViewExtension]:
    """The extensions of an index record, in view order; StoreError (one line) when malformed."""
    try:
        exts = [ViewExtension(str(e["path"]), int(e["first_view"]), int(e["views"]), str(e.get("manifest_sha256", "")))
                for e in doc["extensions"]]  # fmt: skip
    except (KeyError, TypeError, ValueError):
        raise StoreError(
            f"{where}/{INDEX} is not a view-extension index; re-run extract-teacher --add-views"
        ) from None
    for e in exts:
        if (
            e.views < 1
            or e.first_view < 1
            or not e.path.startswith(f"{FOLDER}/")
            or ".." in e.path.split("/")
        ):
            raise StoreError(f"{where}/{INDEX}: bad extension entry {e.path[:60]!r}")
    return sorted(exts, key=lambda e: e.first_view)


def check_chain(k: int, exts: list[ViewExtension], where: str) -> None:
    """Extensions must continue the store's views without a gap or an overlap."""
    nxt = k
    for e in exts:
        if e.first_view != nxt:
            raise StoreError(f"{where}: extension {e.path} starts at view {e.first_view}, expected {nxt}")
        nxt += e.views


def mismatch(base: dict, ext: dict, fields: tuple = RUN_FIELDS + LAYOUT_FIELDS) -> list[str]:
    """What differs between a store's manifest and an extension's identity or manifest: ["teacher", ...]."""
    return [name for name, get in fields if get(base) != get(ext)]


def refuse_mismatch(base: dict, ext: dict, where: str, fields: tuple = RUN_FIELDS + LAYOUT_FIELDS) -> None:
    """One-line StoreError naming what differs (teacher, view policy, seed, key set, ...)."""
    diff = mismatch(base, ext, fields)
    if diff:
        raise StoreError(
            f"{where} is not an extension of this store: it differs in {', '.join(diff)}; "
            "add views with the store's own teacher, view policy, seed and images"
        )


def manifest_sha256(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def read_local_index(root: str | Path) -> list[ViewExtension]:
    """The extensions listed in a local store's index (none when it has no index)."""
    path = Path(root) / INDEX
    if not path.is_file():
        return []
    return parse_index(records.read_record(root, INDEX), str(root))


def register(root: str | Path, ext: ViewExtension) -> None:
    """Add a complete extension to the store's index (atomic; the index is written last)."""
    exts = [e for e in read_local_index(root) if e.path != ext.path] + [ext]
    exts.sort(key=lambda e: e.first_view)
    records.write_record(root, INDEX, {"extensions": [e.entry() for e in exts]}, NEW)


def view_map(k: int, center: bool, exts: list[ViewExtension]) -> np.ndarray:
    """int64 [V_total, 2]: combined view j -> (part, view index in that part); part 0 = the base store,
    part i = extension i-1. The centre view (base index k) comes last."""
    parts = [(0, v) for v in range(k)]
    parts += [(i + 1, v) for i, e in enumerate(exts) for v in range(e.views)]
    parts += [(0, k)] if center else []
    return np.asarray(parts, dtype=np.int64).reshape(-1, 2)


def combine_rows(reads: list[tuple[np.ndarray, np.ndarray, dict]], n: int, v: int) -> dict[str, Any]:
    """Scatter per-part reads into [n, v, ...] arrays: each read is (row idx [m], view idx [m], the
    part's read_rows of those m (row, view) pairs with one view each)."""
    out: dict[str, Any] = {}
    for name in ("cls", "views", "tokens", "token_scale"):
        parts = [(ri, vi, d[name]) for ri, vi, d in reads if d.get(name) is not None]
        if not parts:
            out[name] = None
            continue
        first = parts[0][2]
        arr = np.zeros((n, v, *first.shape[2:]), first.dtype)
        for ri, vi, data in parts:
            arr[ri, vi] = data[:, 0]
        out[name] = arr
    return out


def open_extensions(reader: Any) -> None:
    """Open the extensions in ``reader``'s index (a StoreReader), check them, and make the reader show
    base + extensions: ``extensions``, ``stored_views`` and ``layout.stored_views`` grow."""
    from cospress.store.reader import StoreReader

    try:
        raw = reader._fs.cat_file(reader._path(INDEX))
    except FileNotFoundError:
        return
    exts = parse_index(records.loads(raw), reader.display)
    m = reader.manifest
    check_chain(int(m["k"]), exts, reader.display)
    for e in exts:
        sub = reader.url.rstrip("/") + "/" + e.path
        e.reader = StoreReader(sub, cache_dir=reader.cache_dir, storage_options=reader.storage_options)
        refuse_mismatch(m, e.reader.manifest, f"{reader.display}/{e.path}")
    reader.extensions = exts
    reader.stored_views = reader.base_views + sum(e.views for e in exts)
    reader.layout = dataclasses.replace(reader.layout, stored_views=reader.stored_views)
    reader._view_map = view_map(int(m["k"]), bool(m.get("center_view")), exts)


def read_extended(reader: Any, rows: Any, views: Any, tokens: bool, raw: bool) -> dict[str, Any]:
    """``reader.read_rows`` over base + extensions: each (row, view) read from the part that holds it."""
    r = reader._rows(rows)
    n_views = reader.stored_views
    sel = np.tile(np.arange(n_views), (r.size, 1)) if views is None else np.asarray(views, np.int64)
    if sel.ndim != 2 or sel.shape[0] != r.size:
        raise StoreError(f"views must give the same number of view indices for each of the {r.size} rows")
    if sel.size and (sel.min() < 0 or sel.max() >= n_views):
        raise StoreError(f"view index out of range: the store has {n_views} stored views per row")
    where = reader._view_map[sel]  # [n, v, 2]: (part, view in that part)
    reads = []
    for part, store in enumerate([None, *(e.reader for e in reader.extensions)]):
        ri, vi = np.nonzero(where[..., 0] == part)
        if ri.size:
            read = reader._read_base if store is None else store.read_rows
            reads.append((ri, vi, read(r[ri], views=where[ri, vi, 1][:, None], tokens=tokens, raw=raw)))
    out = {"rows": r, **combine_rows(reads, r.size, sel.shape[1])}
    if not raw:
        del out["token_scale"]
    labels, valid, keys = reader._columns()
    out.update(labels=labels[r], valid=valid[r], keys=[keys[i] for i in r])
    return out


def verify_extensions(reader: Any) -> list[dict]:
    """`verify` of every extension (its files named under its folder), and its manifest against the index."""
    bad = []
    for e in reader.extensions:
        for b in e.reader.verify():
            bad.append({**b, "file": f"{e.path}/{b['file']}"})
        actual = manifest_sha256(e.reader.manifest)
        if e.manifest_sha256 and actual != e.manifest_sha256:
            bad.append({"shard": None, "array": None, "file": f"{e.path}/{NEW.manifest}",
                        "expected": e.manifest_sha256, "actual": actual})  # fmt: skip
    return bad
