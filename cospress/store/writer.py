"""Write a feature store: create the Zarr v3 group, write and commit whole shards, write the manifest last.

zarr rewrites a whole shard file when any chunk of it changes, so two writers of one shard lose
data: every writer (process, thread, rank) owns whole shards, and `StoreWriter.write_shard` writes
each array's shard in one assignment, so its file is written once.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import zarr

import cospress
from cospress.errors import StoreError
from cospress.store import manifest as mf
from cospress.store.codecs import Projection, decode_tokens, encode_tokens
from cospress.store.dest import Dest
from cospress.store.fidelity import codec_fidelity, sample_views
from cospress.store.folder import compressor, create_group, looks_like_store, prepare_folder
from cospress.store.layout import DTYPES, FILL_VALUES, StoreLayout, array_chunks
from cospress.store.metadata import array_encoding, metadata_files
from cospress.store.projection import read_projection, write_projection
from cospress.store.records import NEW, StorePaths
from cospress.store.schema import check_schema_version
from cospress.store.shardio import ShardLayout, shard_parts
from cospress.utils import keys_sha256

log = logging.getLogger(__name__)

FIDELITY_VIEWS = 4  # views per shard whose codec error a commit records (lossy codecs)
_CONFIG = {"write_empty_chunks": True}  # every inner chunk is stored: shard files are deterministic
_looks_like_store = looks_like_store  # its old name here (store/wds_io.py imports it)


class StoreWriter:
    """Writes one store at a local path or an fsspec URL (`cospress.store.dest.Dest`). Use
    `StoreWriter.open`, not the constructor."""

    def __init__(
        self, dest: Dest, identity: dict, arrays: dict[str, zarr.Array], projection: Projection | None = None,
        paths: StorePaths = NEW,
    ):  # fmt: skip
        self.dest = dest
        self.path = dest.path if dest.local else dest.url  # a Path for a local store
        self._manifest_removed = False
        self.paths = paths  # where its records are: the 2.0 layout, or a legacy store's own
        self.identity = identity
        self.arrays = arrays
        self.projection = projection
        self.layout = StoreLayout.from_manifest(identity)
        self.num_rows = self.layout.num_rows
        self.shard_size = self.layout.shard_size
        self.num_shards = self.layout.num_shards
        # Shards below this index belong to a published manifest (append): never rewritten.
        self.protected_shards = 0
        # Arrays whose shard files `shardio` encodes (None: written through zarr)
        self.layouts = {n: ShardLayout.from_metadata(a.metadata.to_dict()) for n, a in arrays.items()}

    def reopen_args(self) -> tuple[str, dict, StoreLayout]:
        """What another process passes to `open` (``create=False``) to write this store's shards."""
        return str(self.path), self.identity, self.layout

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        identity: dict,
        layout: StoreLayout,
        *,
        overwrite: bool = False,
        create: bool = True,
        projection: Projection | None = None,
    ) -> StoreWriter:
        """Create (``create=True``, rank 0) or open (other ranks, after a barrier) a store.

        ``identity`` is the run identity (see `cospress.store.manifest.make_identity`); the layout
        fields (shapes, dtypes, shard size, ...) are added here. An existing store must have the
        same identity, else StoreError names the fields that differ. ``overwrite`` deletes an
        existing store first (never a folder that is not a cospress store). A ``pca`` store is
        created with its ``projection`` (written before the identity); an existing one uses its own.
        """
        if layout.num_rows < 1 or layout.shard_size < 1:
            raise StoreError(
                "a store needs at least one row and shard size >= 1 "
                f"(got {layout.num_rows}, {layout.shard_size})"
            )
        p = Dest(path)
        if not p.local and layout.tokens and layout.token_codec == "pca":
            raise StoreError(
                f"a pca store is written to a local folder, not {p}: extract it there, then publish it"
            )
        if create:
            prepare_folder(p, overwrite)
        paths = p.paths()
        full = mf.full_identity(identity, layout, paths.schema_version)
        if create and not p.exists(paths.identity):
            create_group(p)
            if layout.tokens and layout.token_codec == "pca":
                write_projection(p.path, full, projection)
            p.write_record(paths.identity, full, paths)
        stored = cls._read_identity(p, paths)
        check_schema_version(stored.get("schema_version"), str(p))
        diff = mf.identity_diff(stored, full)
        if diff:
            raise StoreError(
                f"{p} holds a store made by a different run: {'; '.join(diff)}; "
                "--overwrite replaces it (or choose another store path)"
            )
        arrays = cls._open_arrays(p, full, create=create)
        layout = StoreLayout.from_manifest(full)
        pca = layout.tokens and layout.token_codec == "pca"
        proj = read_projection(p.path, full, str(p)) if pca else None
        return cls(p, full, arrays, proj, paths)

    @staticmethod
    def _read_identity(p: Path | Dest, paths: StorePaths | None = None) -> dict:
        p = p if isinstance(p, Dest) else Dest(p)
        paths = paths or p.paths()
        try:
            return p.read_record(paths.identity)
        except FileNotFoundError:
            raise StoreError(
                f"{p} has no {paths.identity}: the store was not created; run rank 0 with create=True first"
            ) from None
        except json.JSONDecodeError as e:
            raise StoreError(
                f"{p}/{paths.identity} is not valid JSON ({e}); --overwrite replaces the store"
            ) from None

    @staticmethod
    def _open_arrays(p: Dest, ident: dict, *, create: bool) -> dict[str, zarr.Array]:
        store = p.zarr_store()
        if not p.exists("zarr.json"):
            if not create:
                raise StoreError(f"{p} has no zarr group yet; rank 0 must create the store first")
            create_group(p)
        layout = StoreLayout.from_manifest(ident)
        arrays = {}
        for name, shape in ident["shapes"].items():
            if p.exists(f"{name}/zarr.json"):
                arrays[name] = zarr.open_array(store=store, path=name, mode="r+", config=_CONFIG)
                if list(arrays[name].shape) != shape:
                    raise StoreError(
                        f"{p}/{name} has shape {arrays[name].shape}, expected {shape}; --overwrite replaces it"
                    )
                continue
            if not create:
                raise StoreError(f"{p}/{name} does not exist yet; rank 0 must create the store first")
            chunks, shards = array_chunks(name, shape, ident["shard_size"])
            dtype = str if DTYPES[name] == "str" else layout.dtype(name)
            arrays[name] = zarr.create_array(
                store=store,
                name=name,
                shape=tuple(shape),
                dtype=dtype,
                chunks=chunks,
                shards=shards,
                compressors=compressor(name, layout.dtype(name)),
                fill_value=FILL_VALUES[name],
                config=_CONFIG,
            )
        return arrays

    # ---- shards -------------------------------------------------------------------------------
    def shard_rows(self, shard: int) -> tuple[int, int]:
        """Row range ``[start, stop)`` of one shard (the last one may be short)."""
        if not 0 <= shard < self.num_shards:
            raise StoreError(f"shard {shard} is out of range: the store has {self.num_shards} shards")
        return self.layout.shard_rows(shard)

    def _shard_files(self, shard: int) -> dict[str, str]:
        return {n: mf.shard_file_key(n, shard, len(s)) for n, s in self.identity["shapes"].items()}

    def _read_commit(self, shard: int) -> dict | None:
        try:
            return self.dest.read_record(self.paths.commit(shard))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def committed_shards(self) -> set[int]:
        """Shards whose commit file is present and whose shard files all exist."""
        self.dest.refresh()
        listed = (self.paths.parse_commit(name) for name in self.dest.names(self.paths.commits))
        shards = sorted(s for s in listed if s is not None and s < self.num_shards)
        need = {s: [self.paths.commit(s), *self._shard_files(s).values()] for s in shards}
        present = self.dest.existing([k for keys in need.values() for k in keys])
        return {s for s, keys in need.items() if present.issuperset(keys)}

    def _check(self, name: str, value: Any, n: int) -> np.ndarray:
        shape = [n, *self.identity["shapes"][name][1:]]
        if name == "keys":
            arr = np.asarray([str(k) for k in value], dtype=object)
            bad = [k for k in arr if not k]
            if bad:
                raise StoreError("an empty key cannot be stored; every row needs its sample key")
        else:
            arr = np.asarray(value)
        if list(arr.shape) != shape:
            raise StoreError(f"write_shard: {name} has shape {list(arr.shape)}, expected {shape}")
        if name == "keys":
            return arr.astype(str)
        return arr.astype(self.layout.dtype(name), copy=False)

    def write_shard(
        self,
        shard: int,
        *,
        cls: Any,
        tokens: Any | None,
        views: Any,
        keys: list[str],
        labels: Any,
        valid: Any,
        skipped: list[dict] | None = None,
        token_scale: Any | None = None,
    ) -> dict:
        """Write one whole shard, hash its files and commit it; returns the commit.

        Arguments hold the shard's ``n`` rows: cls [n, V, Dt], tokens [n, V, T, Dt] float (None when
        the store keeps no tokens), views [n, V, P], keys [n], labels [n], valid [n] (0 = skipped input,
        its features zero-filled); ``skipped`` = [{key, reason}]. Tokens are encoded with the store's
        codec, and for a lossy codec the commit records its `fidelity` on a few views; tokens already
        encoded (a copy from a store of the same codec: merge, import) come with their ``token_scale``.
        Rewriting a shard first removes its commit, so a crash mid-write leaves it uncommitted.
        """
        if shard < self.protected_shards:
            raise StoreError(
                f"shard {shard} of {self.dest} is published in its manifest; an append never rewrites it"
            )
        start, stop = self.shard_rows(shard)
        n = stop - start
        data = {"cls": cls, "views": views, "keys": keys, "labels": labels, "valid": valid}
        fidelity = self._add_tokens(data, tokens, token_scale)
        checked = {name: self._check(name, value, n) for name, value in data.items()}
        commit_key = self.paths.commit(shard)
        self.dest.remove_record(commit_key, self.paths)
        if not self.protected_shards and not self._manifest_removed:  # an append keeps the old manifest
            self.dest.remove_record(self.paths.manifest, self.paths)  # until the new one replaces it
            self._manifest_removed = True
        files = self._shard_files(shard)
        sha = {
            name: self._write_array_shard(name, files[name], start, stop, value)
            for name, value in checked.items()
        }
        key_list = [str(k) for k in checked["keys"]]
        n_valid = int(np.count_nonzero(checked["valid"]))
        commit = {
            "shard": shard,
            "rows": [start, stop],
            "files": files,
            "sha256": sha,
            "keys_sha256": keys_sha256(key_list),
            "skipped": [{"key": str(s["key"]), "reason": str(s["reason"])} for s in (skipped or [])],
            "counts": {"rows": n, "valid": n_valid, "skipped": n - n_valid},
            "written": mf.now_utc(),
        }
        if fidelity is not None:
            commit["fidelity"] = fidelity
        self.dest.write_record(commit_key, commit, self.paths)
        log.debug("committed shard %d (rows %d-%d, %d valid)", shard, start, stop, n_valid)
        return commit

    def _add_tokens(self, data: dict, tokens: Any | None, token_scale: Any | None) -> dict | None:
        """Put the encoded tokens (and token_scale) into ``data``; returns the fidelity or None."""
        if not self.identity["tokens"]:
            if tokens is not None:
                raise StoreError(
                    "this store was created without tokens; pass tokens=None (or re-create it with tokens)"
                )
            return None
        if tokens is None:
            raise StoreError("this store keeps tokens: write_shard needs tokens [n, V, T, Dt]")
        data["tokens"], scale, fidelity = self._encode(tokens, token_scale, data["cls"], data["valid"])
        if scale is not None:
            data["token_scale"] = scale
        return fidelity

    def _encode(
        self, tokens: Any, scale: Any | None, cls: Any, valid: Any
    ) -> tuple[np.ndarray, np.ndarray | None, dict | None]:
        """(tokens as stored, token_scale or None, fidelity on a few views or None)."""
        codec = self.layout.token_codec
        if codec == "fp16":
            if scale is not None:
                raise StoreError("this store keeps fp16 tokens: write_shard takes no token_scale")
            return np.asarray(tokens), None, None
        if scale is not None:  # already encoded with this store's codec (and projection)
            return np.asarray(tokens), np.asarray(scale), None
        tokens = np.asarray(tokens)
        if tokens.ndim != 4 or tokens.shape[-1] != self.layout.dim:
            raise StoreError(
                f"write_shard: tokens have shape {list(tokens.shape)}, expected [n, V, T, {self.layout.dim}]"
            )
        enc, sc = encode_tokens(codec, tokens, self.projection)
        pairs = sample_views(np.asarray(valid), self.layout.stored_views, FIDELITY_VIEWS)
        fidelity = None
        if pairs and self.layout.num_tokens >= 2:
            rows, views = (np.array(x) for x in zip(*pairs, strict=True))
            ref = tokens[rows, views].astype(np.float32)
            dec = decode_tokens(codec, enc[rows, views], sc[rows, views], self.projection)
            fidelity = codec_fidelity(ref, dec, np.asarray(cls)[rows, views])
        return enc, sc, fidelity

    def _write_array_shard(self, name: str, key: str, start: int, stop: int, value: np.ndarray) -> str:
        """Write one array's shard file whole; returns its sha256.

        Arrays whose codecs `shardio` handles are encoded here, chunk by chunk, each chunk hashed and
        written as it comes, into a temp file named after the shard file, then renamed (zarr would spend
        ~1 ms per inner chunk: ~1 s for a tokens shard); others go through zarr. Nothing here lists a folder: the cost of a shard does not
        grow with the shards already written.
        """
        layout = self.layouts[name]
        if layout is None:
            self.arrays[name][start:stop] = value  # one assignment per shard: its file is written once
            return self.dest.sha256(key)
        return self.dest.write_bytes(key, shard_parts(layout, value))

    def finalize(self, extra: dict | None = None) -> dict:
        """Write manifest.json (last, atomically) once every shard is committed; returns it."""
        done = self.committed_shards()
        missing = sorted(set(range(self.num_shards)) - done)
        if missing:
            raise StoreError(
                f"{self.dest}: {len(missing)} of {self.num_shards} shards are not committed "
                f"({mf.format_ranges(missing)}); rerun extract-teacher to finish them"
            )
        commits = []
        for shard in range(self.num_shards):
            commit = self._read_commit(shard)
            if commit is None:
                raise StoreError(
                    f"{self.dest}/{self.paths.commit(shard)} is unreadable; rerun extract-teacher"
                )
            commits.append(commit)
        keys = [str(k) for k in self.arrays["keys"][:]]
        manifest = mf.build_manifest(self.identity, commits, extra, cospress.__version__)
        manifest["keys_sha256"] = keys_sha256(keys)
        manifest["arrays"] = {
            name: array_encoding(json.loads(self.dest.read_bytes(f"{name}/zarr.json")))
            for name in self.identity["shapes"]
        }
        files = metadata_files(manifest, self.paths.commit, self.paths.identity)
        manifest["metadata_sha256"] = {rel: self.dest.sha256(rel) for rel in files}
        self.dest.write_record(self.paths.manifest, manifest, self.paths)
        self._manifest_removed = False
        log.info(
            "store complete: %s (%d rows, %d skipped)",
            self.dest,
            manifest["counts"]["rows"],
            len(manifest["skipped"]),
        )
        return manifest
