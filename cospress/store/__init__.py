"""The teacher feature store: a sharded Zarr v3 group with commits and a manifest written last."""

from cospress.store.layout import StoreLayout
from cospress.store.manifest import make_identity
from cospress.store.reader import StoreReader
from cospress.store.records import is_complete
from cospress.store.remote import check_range_support
from cospress.store.schema import SCHEMA_VERSION
from cospress.store.writer import StoreWriter

__all__ = [
    "SCHEMA_VERSION",
    "StoreLayout",
    "StoreReader",
    "StoreWriter",
    "check_range_support",
    "is_complete",
    "make_identity",
]
