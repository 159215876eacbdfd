"""The order of a store's rows.

Stage 1 writes rows in one of two orders. ``source``: row i is image i of the source (a WebDataset
source keeps its tars' order, so store shard i can line up with tar i). ``shuffled``: the images
sorted by a keyed hash of (seed, key), so every shard holds a random mix of the source: a folder of
class sub-folders lists its images class by class, and a streamed epoch (`cospress.store.stream`,
which reads a few shards at a time) over a store in that order would see one or two classes per
batch. The order depends only on the seed and each key, not on the source's listing order, so every
rank, a resumed run and a view extension derive the same rows.
"""

from __future__ import annotations

import hashlib

import numpy as np

ROW_ORDERS = ("auto", "shuffled", "source")
SHUFFLED = "shuffled"  # the identity's ``row_order`` value (absent: source order, as every older store)


def resolve_row_order(choice: str, source_kind: str) -> str:
    """``auto``: source order for a wds: source (its tars are the streaming unit), shuffled otherwise."""
    if choice == "auto":
        return "source" if source_kind == "wds" else SHUFFLED
    return choice


def store_row_order(identity: dict) -> str:
    """The row order recorded in a store's identity or manifest."""
    return str(identity.get("row_order", "source"))


def shuffled_rows(keys: list[str], seed: int) -> np.ndarray:
    """int64 [N]: the source positions of ``keys`` in shuffled order (~1 s per million keys)."""
    salt = int(seed).to_bytes(8, "little", signed=True)
    digests = b"".join(hashlib.blake2b(k.encode(), digest_size=8, key=salt).digest() for k in keys)
    ranks = np.frombuffer(digests, dtype="<u8") if keys else np.zeros(0, np.uint64)
    return np.argsort(ranks, kind="stable").astype(np.int64)
