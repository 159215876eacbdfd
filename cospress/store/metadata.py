"""The store's metadata files in its manifest (schema 1.3): their hashes, and each array's encoding.

``metadata_sha256`` maps every metadata file (the group's and each array's ``zarr.json``, the
identity, the shard commits) to its sha256, so `StoreReader.verify` covers them as it covers the
shard files. ``arrays`` records how each array is encoded (``data_type``, ``chunk_grid``,
``chunk_key_encoding``, ``codecs``); a reader checks every array's ``zarr.json`` against the manifest
when it opens a store, so a changed dtype or codec is refused instead of read as garbage.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from cospress.errors import StoreError

ENCODING_KEYS = ("data_type", "chunk_grid", "chunk_key_encoding", "codecs")
_ZARR_DTYPES = {"str": "string"}  # the store's dtype names -> zarr v3 data_type


def metadata_files(manifest: dict, commit_key: Callable[[int], str], identity_file: str) -> list[str]:
    """Paths (relative to the store root) of every metadata file of a store with this manifest."""
    from cospress.store.projection import FILES as PROJECTION_FILES

    arrays = [f"{name}/zarr.json" for name in manifest["shapes"]]
    if manifest.get("tokens") and (manifest.get("token_codec") or {}).get("name") == "pca":
        arrays += list(PROJECTION_FILES)
    commits = [commit_key(int(s["shard"])) for s in manifest["shards"]]
    return ["zarr.json", *arrays, identity_file, *commits]


def array_encoding(meta: dict) -> dict[str, Any]:
    """The encoding fields of one array's ``zarr.json`` (shape and attributes left out)."""
    return {k: meta.get(k) for k in ENCODING_KEYS}


def check_array(name: str, meta: dict, manifest: dict, where: str) -> None:
    """StoreError (one line) unless array ``name``'s metadata ``meta`` (its ``zarr.json``) matches the
    manifest: dtype, shape (axis 0 may be longer: an append in progress), shard shape and, from
    schema 1.3 on, the recorded encoding (codecs, chunk grid, key encoding)."""
    meta = json.loads(json.dumps(meta, default=str))  # zarr's dict holds tuples: compare JSON
    want_shape = list(manifest["shapes"][name])
    shard_size = int(manifest["shard_size"])
    want_dtype = _ZARR_DTYPES.get(manifest["dtypes"][name], manifest["dtypes"][name])
    shape = list(meta.get("shape") or [])
    grid = ((meta.get("chunk_grid") or {}).get("configuration") or {}).get("chunk_shape")
    problem = None
    if meta.get("data_type") != want_dtype:
        problem = f"data_type {str(meta.get('data_type'))[:20]}, the manifest says {want_dtype}"
    elif len(shape) != len(want_shape) or shape[1:] != want_shape[1:] or shape[0] < want_shape[0]:
        problem = f"shape {str(shape)[:40]}, the manifest says {want_shape}"
    elif grid != [shard_size, *want_shape[1:]]:
        problem = f"shards of {str(grid)[:40]}, the manifest says {[shard_size, *want_shape[1:]]}"
    else:
        recorded = (manifest.get("arrays") or {}).get(name)
        got = array_encoding(meta)
        diff = [k for k in ENCODING_KEYS if recorded is not None and recorded.get(k) != got[k]]
        if diff:
            problem = f"{diff[0]} {str(got[diff[0]])[:60]}, not the manifest's"
    if problem:
        raise StoreError(
            f"{where}: {name}/zarr.json has {problem}; the store's metadata was changed: "
            "re-extract or re-upload the store (cospress verify names the changed files)"
        )


__all__ = ["ENCODING_KEYS", "array_encoding", "check_array", "metadata_files"]
