"""The teacher feature store: a sharded Zarr v3 group with commits and a manifest written last."""

from cospress.store.manifest import SCHEMA_VERSION, estimate_store_bytes, make_identity
from cospress.store.reader import StoreReader, check_range_support
from cospress.store.writer import StoreWriter

__all__ = [
    "SCHEMA_VERSION",
    "StoreReader",
    "StoreWriter",
    "check_range_support",
    "estimate_store_bytes",
    "make_identity",
]
