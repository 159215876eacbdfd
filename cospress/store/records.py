"""Where a store keeps its own records: the identity, the shard commits, the manifest, the config.

From schema 2.0 every record is a Zarr group node under ``cospress/`` whose attributes are the
record, so the whole store is a Zarr hierarchy and ``zarr.open_group(store)`` lists it without a
warning (zarr-python warns once per object at a group's root that is not a Zarr node)::

    cospress/zarr.json                        group (the records)
    cospress/identity/zarr.json               attributes: the identity, written when the store is created
    cospress/config/zarr.json                 attributes: the resolved extract-teacher config
    cospress/commits/shard-000123/zarr.json   attributes: one shard's commit
    cospress/manifest/zarr.json               attributes: the manifest, written LAST

Stores before 2.0 keep them as plain files at the root (`LEGACY`: ``cospress-store.json``,
``commits/shard-NNNNNN.json``, ``manifest.json``, ``extract-config.yaml``); they are read, verified,
resumed, appended and published in their own layout.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cospress.utils import atomic_write_json

RECORDS_DIR = "cospress"
_GROUP = {"zarr_format": 3, "node_type": "group"}


@dataclass(frozen=True)
class StorePaths:
    """The record paths of one store layout, relative to its root ("/"-separated)."""

    legacy: bool
    identity: str
    manifest: str
    commits: str
    config: str
    schema_version: str

    def commit(self, shard: int) -> str:
        return (
            f"{self.commits}/shard-{shard:06d}.json"
            if self.legacy
            else f"{self.commits}/shard-{shard:06d}/zarr.json"
        )

    def parse_commit(self, name: str) -> int | None:
        """The shard of an entry of the commits folder (a file in a legacy store, a folder from 2.0)."""
        m = re.match(r"^shard-(\d{6,})\.json$" if self.legacy else r"^shard-(\d{6,})$", name)
        return int(m.group(1)) if m else None

    def is_record(self, key: str) -> bool:
        """Whether ``key`` (a file of the store) is one of its records or their group nodes."""
        if self.legacy:
            return key in (self.identity, self.manifest, self.config) or key.startswith(f"{self.commits}/")
        return key.startswith(f"{RECORDS_DIR}/")


NEW = StorePaths(
    legacy=False, identity=f"{RECORDS_DIR}/identity/zarr.json", manifest=f"{RECORDS_DIR}/manifest/zarr.json",
    commits=f"{RECORDS_DIR}/commits", config=f"{RECORDS_DIR}/config/zarr.json", schema_version="2.1",
)  # fmt: skip
LEGACY = StorePaths(
    legacy=True, identity="cospress-store.json", manifest="manifest.json", commits="commits",
    config="extract-config.yaml", schema_version="1.4",
)  # fmt: skip


def detect(root: str | Path) -> StorePaths:
    """The layout of the local store at ``root``: LEGACY when it holds a pre-2.0 identity or manifest
    (and no 2.0 one), else NEW (also for a store not created yet)."""
    p = Path(root)
    if (p / NEW.identity).exists() or (p / NEW.manifest).exists():
        return NEW
    return LEGACY if (p / LEGACY.identity).exists() or (p / LEGACY.manifest).exists() else NEW


def is_complete(root: str | Path) -> bool:
    """Whether the local store at ``root`` has its manifest (either layout): extraction finished."""
    return (Path(root) / detect(root).manifest).is_file()


def encode(doc: dict, paths: StorePaths) -> dict:
    """The JSON a record file holds: the document (legacy) or a Zarr group with it as attributes."""
    return doc if paths.legacy else {**_GROUP, "attributes": doc}


def decode(raw: Any) -> Any:
    """The document of a record file's JSON (either layout)."""
    if isinstance(raw, dict) and raw.get("node_type") == "group" and "zarr_format" in raw:
        return raw.get("attributes", {})
    return raw


def loads(data: bytes | str) -> Any:
    """`decode` of the JSON text ``data`` (json.JSONDecodeError when it is not JSON)."""
    return decode(json.loads(data))


def read_record(root: str | Path, key: str) -> Any:
    """The document of the record file ``key`` of the local store at ``root`` (FileNotFoundError,
    json.JSONDecodeError as reading raises them)."""
    return loads((Path(root) / key).read_text())


def write_record(root: str | Path, key: str, doc: dict, paths: StorePaths) -> None:
    """Write a record atomically; from 2.0 the group nodes above it (``cospress/``, ``commits/``) too."""
    root = Path(root)
    if not paths.legacy:
        parts = key.split("/")[:-2]  # the folders above the record's own group
        for i in range(1, len(parts) + 1):
            node = root.joinpath(*parts[:i], "zarr.json")
            if not node.exists():
                atomic_write_json(node, {**_GROUP, "attributes": {}})
    atomic_write_json(root / key, encode(doc, paths))


def remove_record(root: str | Path, key: str, paths: StorePaths) -> None:
    """Delete a record (from 2.0 its folder too, so no empty non-Zarr folder is left)."""
    path = Path(root) / key
    path.unlink(missing_ok=True)
    if not paths.legacy:
        try:
            path.parent.rmdir()
        except OSError:  # not empty (a temp file of a concurrent write) or already gone
            pass


__all__ = ["LEGACY", "NEW", "RECORDS_DIR", "StorePaths", "decode", "detect", "encode", "is_complete", "loads",
           "read_record", "remove_record", "write_record"]  # fmt: skip
