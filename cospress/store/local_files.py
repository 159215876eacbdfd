"""The files of a finished local store, checked against its manifest before `cospress publish` sends
any: no symbolic link or special file, every listed file present with the manifest's sha256. Each file
is read once, for its sha256 and (for an object store, whose single-part ETag is the MD5) its MD5.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cospress.errors import StoreError
from cospress.store import manifest as mf
from cospress.store.records import StorePaths


@dataclass(frozen=True)
class LocalFile:
    key: str  # path relative to the store root, "/"-separated
    size: int
    sha256: str
    md5: str | None  # computed for object stores, whose single-part ETag is the MD5


def _walk(root: Path) -> list[tuple[str, int]]:
    """(key, size) of every regular file of the store but temp files (names starting with ".");
    StoreError at the first symbolic link or special file (publish follows none)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):  # does not descend into linked folders
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = os.lstat(p)
            key = p.relative_to(root).as_posix()
            if stat.S_ISLNK(st.st_mode):
                raise StoreError(
                    f"{root} holds a symbolic link {key} (to {os.readlink(p)[:80]}): publish follows no "
                    "links; replace it with the file itself or remove it"
                )
            if stat.S_ISDIR(st.st_mode) or name.startswith("."):
                continue
            if not stat.S_ISREG(st.st_mode):
                raise StoreError(f"{root} holds {key}, which is not a regular file: remove it, then publish")
            out.append((key, st.st_size))
    return out


def _hash(path: Path, md5: bool) -> tuple[str, str | None]:
    """sha256 (and MD5) of one file, read once; the open follows no link."""
    sha, m = hashlib.sha256(), hashlib.md5() if md5 else None
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        while block := f.read(1 << 22):
            sha.update(block)
            if m is not None:
                m.update(block)
    return sha.hexdigest(), (m.hexdigest() if m is not None else None)


def _expected_sha256(manifest: dict) -> dict[str, str]:
    """key -> sha256 of every file the manifest lists: shard files and (schema 1.3 on) metadata files."""
    known = dict(manifest.get("metadata_sha256") or {})
    for entry in manifest["shards"]:
        for name, sha in entry["sha256"].items():
            known[mf.shard_file_key(name, entry["shard"], len(manifest["shapes"][name]))] = sha
    return known


def local_files(
    root: Path, manifest: dict, paths: StorePaths, md5: bool, progress: Callable[[int, int], None]
) -> list[LocalFile]:
    """Every file of the store, hashed (in a few threads) and checked against the manifest, in upload
    order: the identity, the data files, the other records, the manifest last. StoreError when a file
    the manifest lists is missing or has another sha256: nothing is sent from such a store."""
    found = _walk(root)
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        hashes = []
        for i, h in enumerate(pool.map(lambda kf: _hash(root / kf[0], md5), found), 1):
            hashes.append(h)
            progress(i, len(found))
    files = [LocalFile(k, size, sha, m) for (k, size), (sha, m) in zip(found, hashes, strict=True)]
    known = _expected_sha256(manifest)
    have = {f.key: f.sha256 for f in files}
    bad = sorted(k for k, sha in known.items() if have.get(k) != sha)
    if bad:
        missing = sum(k not in have for k in bad)
        raise StoreError(
            f"the local store {root} does not match its manifest ({len(bad)} files, {missing} missing; first: "
            f"{bad[0]}): nothing was sent; run `cospress verify {root}`, then fix or re-extract it"
        )

    def order(f: LocalFile) -> int:
        if f.key == paths.identity:
            return 0  # first: a resumed publish recognises its own partial copy
        if f.key == paths.manifest:
            return 3
        return 2 if paths.is_record(f.key) else 1

    return sorted(files, key=order)
