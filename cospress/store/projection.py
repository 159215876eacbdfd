"""The stored projection of a ``pca`` store: ``token_projection/`` (a Zarr group of two arrays).

``token_projection/mean`` float32 [Dt] and ``token_projection/basis`` float32 [k, Dt], one chunk each,
written once, before the store's identity, by the process that creates the store; every rank, resume
and append reads it back, so one store never mixes two projections. Its hash (`Projection.sha256`,
over the values) is the identity's ``token_codec.projection_sha256``; a reader refuses a projection
whose values do not match it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from cospress.errors import StoreError
from cospress.store.codecs import Projection

GROUP = "token_projection"
FILES = (f"{GROUP}/zarr.json", f"{GROUP}/mean/zarr.json", f"{GROUP}/mean/c/0",
         f"{GROUP}/basis/zarr.json", f"{GROUP}/basis/c/0/0")  # fmt: skip


def codec_entry(name: str, projection: Projection | None = None, fit: dict | None = None) -> dict[str, Any]:
    """The identity's ``token_codec`` for a codec (and, for pca, its projection and what its fit
    recorded: sample views, held-out fidelity)."""
    if name != "pca":
        return {"name": name}
    if projection is None:
        raise StoreError("a pca token codec needs its fitted projection")
    entry = {"name": "pca", "components": projection.components, "projection_sha256": projection.sha256()}
    if fit is not None:
        entry["fit"] = dict(fit)
    return entry


def write_projection(store: Any, identity: dict, projection: Projection | None) -> None:
    """Write ``projection`` into the zarr store (path or Store) of a new pca store with this identity."""
    want = (identity.get("token_codec") or {}).get("projection_sha256")
    if projection is None or projection.sha256() != want:
        raise StoreError("a pca store is created with the projection its identity names; fit it first")
    if not isinstance(store, zarr.abc.store.Store):
        store = zarr.storage.LocalStore(store)
    zarr.create_group(store=store, path=GROUP, zarr_format=3, overwrite=True,
                      attributes={"components": projection.components, "sha256": want})  # fmt: skip
    for name, value in (("mean", projection.mean), ("basis", projection.basis)):
        a = np.ascontiguousarray(value, dtype="<f4")
        arr = zarr.create_array(store=store, name=f"{GROUP}/{name}", shape=a.shape, dtype="float32",
                                chunks=a.shape, compressors=None, fill_value=0, overwrite=True)  # fmt: skip
        arr[...] = a


def read_projection(store: Any, identity: dict, where: str) -> Projection:
    """The projection of a pca store, checked against the identity's hash (StoreError otherwise)."""
    codec = identity.get("token_codec") or {}
    if not isinstance(store, zarr.abc.store.Store):
        store = zarr.storage.LocalStore(store, read_only=True)
    dim, comps = int(identity["dim"]), int(codec.get("components", -1))
    try:
        arrays = [
            zarr.open_array(store=store, path=f"{GROUP}/{name}", mode="r") for name in ("mean", "basis")
        ]
        shapes = [(dim,), (comps, dim)]  # checked before reading: never a crafted size
        if any(a.shape != want or a.chunks != want for a, want in zip(arrays, shapes, strict=True)):
            raise StoreError(
                f"{where}: {GROUP}/ has shapes {list(arrays[0].shape)[:4]} and {list(arrays[1].shape)[:4]}, not the "
                f"identity's [{dim}] and [{comps}, {dim}]; the store was changed: re-extract or re-upload it"
            )
        mean, basis = (np.asarray(a[...], np.float32) for a in arrays)
    except (FileNotFoundError, KeyError, ValueError, TypeError) as e:
        raise StoreError(
            f"{where}: the pca projection ({GROUP}/) cannot be read ({type(e).__name__}); "
            "the store is incomplete or corrupted: re-extract or re-upload it"
        ) from None
    proj = Projection(mean, basis)
    if proj.sha256() != codec.get("projection_sha256"):
        raise StoreError(
            f"{where}: {GROUP}/ does not match the projection_sha256 of the store's identity; "
            "the store was changed: re-extract or re-upload it"
        )
    return proj


__all__ = ["FILES", "GROUP", "codec_entry", "read_projection", "write_projection"]
