"""The files of a WebDataset export of a store: plain .npy members (never unpickled), safe member
paths, the most bytes a member may hold, and a pca store's projection beside the tars."""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from cospress.errors import StoreError
from cospress.store.layout import StoreLayout
from cospress.utils import npy_bytes, sha256_file

PROJECTION_FILES = {"mean": "token_projection-mean.npy", "basis": "token_projection-basis.npy"}
_STALE = "copy the whole export folder"


def write_projection_files(out: Path, projection: Any) -> dict[str, dict[str, str]]:
    files = {}
    for part, name in PROJECTION_FILES.items():
        (out / name).write_bytes(npy_bytes(np.asarray(getattr(projection, part), "<f4")))
        files[part] = {"name": name, "sha256": sha256_file(out / name)}
    return files


def read_projection_files(src: Path, doc: dict) -> Any:
    """The projection of an exported pca store, checked against the identity's hash; else None."""
    from cospress.store.codecs import Projection

    codec = doc["identity"].get("token_codec") or {}
    if codec.get("name") != "pca" or not doc["identity"]["tokens"]:
        return None
    files = doc.get("projection") or {}
    parts = {}
    for part, name in PROJECTION_FILES.items():
        path = src / name
        if not path.is_file() or sha256_file(path) != (files.get(part) or {}).get("sha256"):
            raise StoreError(f"{path} is missing or does not match the export's sidecar; {_STALE}")
        shape = (
            [int(codec["components"]), doc["identity"]["dim"]]
            if part == "basis"
            else [doc["identity"]["dim"]]
        )
        parts[part] = load_npy(path.read_bytes(), shape, str(path), "<f4")
    proj = Projection(parts["mean"], parts["basis"])
    if proj.sha256() != codec.get("projection_sha256"):
        raise StoreError(
            f"{src}: the projection files do not match the identity's projection_sha256; export again"
        )
    return proj


def safe_member(member: tarfile.TarInfo, tar: Path) -> None:
    name = member.name
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
        raise StoreError(f"{tar} holds an unsafe member path {name[:80]!r}; refusing to import it")
    if not member.isfile():
        raise StoreError(f"{tar} holds {name[:80]!r}, which is not a regular file; refusing to import it")


_NPY_HEADER_MAX = 1 << 16  # np.save writes headers of ~128 bytes; format 1.0 allows up to 64 KiB


def member_limits(ident: dict) -> dict[str, int]:
    """The most bytes each member of a sample of a store with identity ``ident`` can hold."""
    v, dim, t, p = ident["num_views"], ident["dim"], ident["num_tokens"], ident["num_params"]
    limits = {"cls.npy": _NPY_HEADER_MAX + v * dim * 2, "json": (1 << 20) + v * p * 32}
    if ident["tokens"]:
        layout = StoreLayout.from_manifest(ident)
        per_value = np.dtype(layout.dtype("tokens")).itemsize
        limits["tokens.npy"] = _NPY_HEADER_MAX + v * t * layout.token_dim * per_value
        if layout.token_codec != "fp16":
            limits["token_scale.npy"] = _NPY_HEADER_MAX + v * t * 2
    return limits


def load_npy(raw: bytes, shape: list[int], what: str, want: str = "<f2") -> np.ndarray:
    """The array of dtype ``want`` and shape ``shape`` in .npy bytes ``raw``; the header is read and checked
    first, so a crafted header (a huge shape, an object dtype) allocates nothing and unpickles nothing."""
    from numpy.lib import format as npy_format

    f = io.BytesIO(raw)
    try:
        version = npy_format.read_magic(f)
        read_header = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}
        if version not in read_header:
            raise ValueError(f"unsupported .npy format version {version}")
        got, fortran, dtype = read_header[version](f, max_header_size=_NPY_HEADER_MAX)
    except ValueError as e:
        raise StoreError(f"{what} is not a plain .npy array ({e}); export the store again") from None
    if dtype.hasobject:
        raise StoreError(f"{what} is not a plain .npy array (object dtype); export the store again")
    want_dtype = np.dtype(want)
    if dtype.str[1:] != want_dtype.str[1:] or list(got) != shape or fortran:
        raise StoreError(
            f"{what} is {dtype} {str(list(got))[:60]}, expected {want_dtype} {shape}; export the store again"
        )
    data = raw[f.tell() :]
    nbytes = int(np.prod(shape)) * want_dtype.itemsize
    if len(data) != nbytes:
        raise StoreError(f"{what} holds {len(data)} data bytes, not {nbytes}; export again")
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(want_dtype.newbyteorder("="))
