"""Test helpers for store layouts: turn a store of this schema into one of an older, legacy layout."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from cospress.store.records import LEGACY, NEW, read_record


def to_legacy(store: Path, version: str, edit: Callable[[dict], None] | None = None) -> None:
    """Rewrite the store at ``store`` as a pre-2.0 store: its identity, commits and manifest as plain
    JSON files at the root (``cospress-store.json``, ``commits/shard-NNNNNN.json``, ``manifest.json``)
    with ``schema_version`` = ``version``; ``edit(doc)`` changes the identity and the manifest further.
    The manifest's metadata hashes are recomputed for the moved files when it has them."""
    import hashlib

    for shard in sorted(int(p.name.split("-")[1]) for p in (store / NEW.commits).glob("shard-*")):
        (store / LEGACY.commits).mkdir(exist_ok=True)
        (store / LEGACY.commit(shard)).write_text(json.dumps(read_record(store, NEW.commit(shard)), indent=2))
    docs = {}
    for key_new, key_old in ((NEW.identity, LEGACY.identity), (NEW.manifest, LEGACY.manifest)):
        doc = read_record(store, key_new)
        doc["schema_version"] = version
        if edit is not None:
            edit(doc)
        docs[key_old] = doc
    identity = docs[LEGACY.identity]
    (store / LEGACY.identity).write_text(json.dumps(identity, indent=2) + "\n")
    manifest = docs[LEGACY.manifest]
    if "metadata_sha256" in manifest:
        moved = {
            NEW.identity: LEGACY.identity,
            **{NEW.commit(s["shard"]): LEGACY.commit(s["shard"]) for s in manifest["shards"]},
        }
        manifest["metadata_sha256"] = {
            moved.get(k, k): hashlib.sha256((store / moved.get(k, k)).read_bytes()).hexdigest()
            for k in manifest["metadata_sha256"]
        }
    shutil.rmtree(store / "cospress")
    (store / LEGACY.manifest).write_text(json.dumps(manifest, indent=2) + "\n")
