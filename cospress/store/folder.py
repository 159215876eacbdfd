"""A new store's folder: refuse a path that is not a store, create the root group, the codecs of
its arrays."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import zarr
from zarr.codecs import BloscCodec

from cospress.errors import StoreError
from cospress.store.dest import Dest
from cospress.store.layout import DTYPES
from cospress.store.records import LEGACY, NEW
from cospress.store.schema import FORMAT_NAME

log = logging.getLogger(__name__)


def compressor(name: str, dtype: str) -> Any:
    """The blosc codec of array ``name`` (measured: pipelines/bench/bench_writer.py, docs/performance.md).

    ``tokens`` (float16 or int8) are ~99% of a store's bytes and dense teacher tokens barely compress
    (~1.07-1.15x with zstd at ~0.5 GB/s per core): lz4 level 1 without shuffle encodes them at ~3 GB/s
    per core (and still shrinks sparse maps), so the writer keeps up with a GPU teacher. The small
    arrays (cls, token_scale, views, labels, valid) keep zstd level 1, which pays on them.
    """
    if DTYPES[name] == "str":
        return "auto"
    if name == "tokens":
        return BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle")
    if dtype == "int8":  # byte shuffle does nothing for 1-byte values and halves blosc's decode speed
        return BloscCodec(cname="zstd", clevel=1, shuffle="noshuffle")
    # zstd level 1 with byte shuffle: within 1% of level 3's ratio on float16 embeddings, ~2.5x faster
    return BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")


def looks_like_store(path: Path) -> bool:
    if any((path / key).exists() for paths in (NEW, LEGACY) for key in (paths.identity, paths.manifest)):
        return True
    try:  # the group is written first: a store whose creation was interrupted
        return json.loads((path / "zarr.json").read_text())["attributes"]["format"] == FORMAT_NAME
    except (OSError, ValueError, KeyError, TypeError):
        return False


def create_group(p: Dest) -> None:
    """The store's root Zarr group (written first: a folder holding it is a store being created)."""
    if not p.exists("zarr.json"):
        zarr.create_group(store=p.zarr_store(), zarr_format=3, attributes={"format": FORMAT_NAME})


def _remote_is_store(p: Dest) -> bool:
    if any(p.exists(key) for key in (NEW.identity, NEW.manifest)):
        return True
    try:
        return json.loads(p.read_bytes("zarr.json"))["attributes"]["format"] == FORMAT_NAME
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _prepare_remote(p: Dest, overwrite: bool) -> None:
    """A URL: refuse a prefix holding other objects; ``overwrite`` deletes the store under it."""
    if not p.names(""):
        return
    if not _remote_is_store(p):
        raise StoreError(f"{p} holds objects and is not a cospress store; choose another store URL")
    if overwrite:
        log.info("overwrite: deleting the existing store at %s", p)
        p.fs.rm(p.base, recursive=True)
        p.refresh()


def prepare_folder(dest: Dest, overwrite: bool) -> None:
    """Refuse a path that is a file or a non-empty folder that is not a store; ``overwrite``
    deletes an existing store (never a folder that is not one)."""
    if not dest.local:
        _prepare_remote(dest, overwrite)
        return
    p = dest.path
    if p.exists() and not p.is_dir():
        raise StoreError(f"{p} is a file, not a store folder; choose another store path")
    if overwrite and p.exists() and any(p.iterdir()):
        if not looks_like_store(p):
            raise StoreError(
                f"{p} exists and is not a cospress store; refusing to delete it with --overwrite: "
                "choose another store path"
            )
        log.info("overwrite: deleting the existing store at %s", p)
        shutil.rmtree(p)
    if p.exists() and any(p.iterdir()) and not looks_like_store(p):
        raise StoreError(f"{p} exists, is not empty and is not a cospress store; choose another store path")
