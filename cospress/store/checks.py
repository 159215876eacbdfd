"""What `StoreReader` checks and reports without reading rows: identity, checksums, the summary."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cospress.errors import CospressError, StoreError
from cospress.netio import retry
from cospress.store import manifest as mf
from cospress.store.guard import check_scale, check_shard_file, file_problem, local_file
from cospress.store.remote import is_local
from cospress.utils import redact_config, redact_text, redact_url

log = logging.getLogger("cospress.store.reader")


def _mismatch(shard: int | None, array: str | None, file: str, expected: str, actual: str | None) -> dict:
    return {"shard": shard, "array": array, "file": file, "expected": expected, "actual": actual}


def interrupted_append(reader: Any, bad: list[dict]) -> None:
    """StoreError saying what happened when the only files that differ from the manifest are the
    identity and arrays' ``zarr.json`` grown by an `extract-teacher --append` that did not finish
    (its new shards are not in the manifest yet; the store still reads as the manifest says)."""
    from cospress.store import records

    ident_key = reader.paths.identity
    arrays = {f"{name}/zarr.json" for name in reader.manifest["shapes"]}
    files = {b["file"] for b in bad}
    if (
        any(b["shard"] is not None for b in bad)
        or ident_key not in files
        or not files <= arrays | {ident_key}
    ):
        return
    try:
        identity = records.loads(reader._fs.cat_file(reader._path(ident_key)))
        grown = int(identity["num_rows"])
    except Exception:
        return
    old = int(reader.manifest["num_rows"])
    if grown <= old:
        return
    raise StoreError(
        f"{reader.display}: an `extract-teacher --append` was interrupted: its identity and "
        f"{len(files) - 1} array metadata files already describe {grown} rows, the manifest {old}; every "
        f"shard checksum matches and readers still see the manifest's {old} rows. Finish it: rerun the same "
        "`cospress extract-teacher --append` command; or undo it: rerun `--append` with the store's own "
        "--data (it adds nothing and restores the metadata)"
    )


class ReaderChecks:
    """The checks of a store reader (mixed into `cospress.store.reader.StoreReader`, which sets
    ``manifest``, ``display``, ``url``, ``layout``, ``_fs``, ``_root`` and ``_path``)."""

    manifest: dict
    display: str
    url: str
    layout: Any
    has_tokens: bool
    shard_size: int
    num_shards: int
    _fs: Any
    _root: str

    def _path(self, key: str) -> str:
        return f"{self._root}/{key}"

    def check_identity(
        self, expect_teacher: str | None = None, policy_fingerprint: str | None = None
    ) -> None:
        """StoreError unless the store was made by this teacher and view policy.

        ``expect_teacher`` is a teacher fingerprint (``FeatureModel.fingerprint()``) or, less
        strictly, a teacher name; ``policy_fingerprint`` is ``ViewPolicy.fingerprint()``.
        """
        teacher = self.manifest.get("teacher") or {}
        if expect_teacher is not None and expect_teacher not in (
            teacher.get("fingerprint"),
            teacher.get("name"),
        ):
            raise StoreError(
                f"{self.display} was made by teacher {teacher.get('name')} (fingerprint "
                f"{str(teacher.get('fingerprint'))[:12]}), not {expect_teacher[:64]}: use the matching teacher "
                "or extract a store with this one"
            )
        have = self.manifest.get("policy_fingerprint")
        if policy_fingerprint is not None and policy_fingerprint != have:
            raise StoreError(
                f"{self.display} was made with view policy {str(have)[:12]}, not {policy_fingerprint[:12]}: "
                "use the store's policy (cospress inspect shows it) or extract a new store"
            )

    def _hash_file(self, key: str) -> tuple[str | None, int]:
        """(sha256, size) of the store's file ``key``; (None, 0) when it is missing."""
        path = self._path(key)

        def digest() -> tuple[str, int]:
            h, size = hashlib.sha256(), 0
            with self._fs.open(path, "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
                    size += len(block)
            return h.hexdigest(), size

        try:
            if is_local(self.url):
                path = local_file(self._root, key, self.display)  # inside the store, a regular file
                return digest()
            return retry(digest, f"{path} of {self.display}")
        except FileNotFoundError:
            return None, 0
        except CospressError:
            raise
        except Exception as e:
            raise StoreError(
                f"cannot read {redact_url(path)} of {self.display}: "
                f"{redact_text(f'{type(e).__name__}: {e}')}; check the network and retry"
            ) from None

    def verify(self, progress: Callable[[int, int], None] | None = None) -> list[dict]:
        """Recompute the sha256 of every shard file and (schema 1.3 on) every metadata file: each
        array's zarr.json, the group's, the identity, the commits; returns the mismatches.

        Each bad entry: {shard, array, file, expected, actual} (actual None when the file is missing;
        shard and array None for a metadata file).
        ``progress(done, total)`` is called after each shard.
        """
        bad = []
        shards = self.manifest["shards"]
        for done, entry in enumerate(shards, 1):
            for name, expected in entry["sha256"].items():
                ndim = len(self.manifest["shapes"][name])
                rel = mf.shard_file_key(name, entry["shard"], ndim)
                actual, size = self._hash_file(rel)
                if actual != expected:
                    bad.append(_mismatch(entry["shard"], name, rel, expected, actual))
                else:  # the manifest's own file: are its declared rows possible in it?
                    check_shard_file(self.manifest, name, entry, size, rel, self.display)
            if progress is not None:
                progress(done, len(shards))
        for rel, expected in self.manifest.get("metadata_sha256", {}).items():  # schema 1.3 on
            actual, _ = self._hash_file(rel)
            if actual != expected:
                bad.append(_mismatch(None, None, rel, expected, actual))
        if getattr(self, "extensions", None):
            from cospress.store.extensions import verify_extensions

            bad += verify_extensions(self)
        if bad:
            interrupted_append(self, bad)
            log.warning("%s: %d files do not match the manifest", self.display, len(bad))
        else:
            self._check_values()
        return bad

    def _check_values(self) -> None:
        """What checksums cannot vouch for in a store whose files match its manifest: every shard file
        readable within the reader's bounds (sizes, index, codec headers; remote: the index only),
        the pca projection, and every token scale finite and >= 0."""
        arrays = self._arrays  # type: ignore[attr-defined]  # opening checks metadata and file sizes
        for entry in self.manifest["shards"]:
            for name, shape in self.manifest["shapes"].items():
                self._check_file(name, mf.shard_file_key(name, entry["shard"], len(shape)))
        if not self.has_tokens or self.layout.token_codec == "fp16":
            return
        self.projection  # type: ignore[attr-defined]  # noqa: B018 - checked against the identity's hash
        scale = arrays["token_scale"]
        for entry in self.manifest["shards"]:
            start, stop = entry["rows"]
            key = mf.shard_file_key("token_scale", entry["shard"], 3)
            check_scale(scale[start:stop], f"{self.display}: {key}")

    def _check_file(self, name: str, key: str) -> None:
        spec = self._specs[name]  # type: ignore[attr-defined]
        if is_local(self.url):
            fd = os.open(local_file(self._root, key, self.display), os.O_RDONLY)
            try:
                problem = file_problem(lambda o, n: os.pread(fd, n, o), os.fstat(fd).st_size, spec)
            finally:
                os.close(fd)
        else:  # the index alone: a header check would cost one request per chunk
            path = self._path(key)
            read_at = lambda o, n: self._fs.cat_file(path, start=o, end=o + n)  # noqa: E731
            problem = file_problem(read_at, self._fs.size(path), spec, headers=False)
        if problem:
            raise StoreError(
                f"{self.display}: shard file {key} is corrupted: {problem}; re-upload or re-extract the store"
            )

    def summary(self) -> dict:
        """What `cospress inspect` shows: teacher, policy, shapes, counts, shards, size."""
        m = self.manifest
        teacher = m.get("teacher") or {}
        disk = None
        if is_local(self.url):
            disk = sum(f.stat().st_size for f in Path(self._root).rglob("*") if f.is_file())
        out = {
            "url": self.display,
            "schema_version": m.get("schema_version"),
            "cospress_version": m.get("cospress_version"),
            "created": m.get("created"),
            "teacher": {
                k: teacher.get(k) for k in ("name", "fingerprint", "input_size", "layer", "dim", "grid")
            },
            "source": {k: (m.get("source") or {}).get(k) for k in ("spec", "kind", "count", "keys_sha256")},
            "policy_fingerprint": m.get("policy_fingerprint"),
            "view_policy": m.get("view_policy"),
            "k": m.get("k"),
            "center_view": m.get("center_view"),
            "seed": m.get("seed"),
            "shapes": m["shapes"],
            "dtypes": m["dtypes"],
            "tokens": self.has_tokens,
            "token_codec": m.get("token_codec") or {"name": "fp16"},
            "fidelity": m.get("fidelity"),
            "shard_size": self.shard_size,
            "shards": self.num_shards,
            "counts": m.get("counts"),
            "skipped": len(m.get("skipped", [])),
            "estimated_bytes": self.layout.estimate_bytes(),
            "bytes_on_disk": disk,
        }
        if getattr(self, "extensions", None):  # view extensions (store.extensions): base + extensions
            out["stored_views"] = self.stored_views
            out["extensions"] = [e.entry() for e in self.extensions]
        return redact_config(out)  # an older store may hold a source URL with its credentials
