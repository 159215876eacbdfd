"""The layout of a store: its row count, shard size and array shapes, as one object.

A store holds N rows (one image each, named by its key), each with V stored views (K + the centre
view when kept) of a teacher with D dims and T tokens, and P view params per view. On disk the
stored views are called ``num_views`` (identity and manifest); the names here follow the glossary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from cospress.store.codecs import codec_name, stored_bytes_per_token, token_dim

ARRAY_NAMES = ("cls", "tokens", "token_scale", "views", "keys", "labels", "valid")
DTYPES = {
    "cls": "float16",
    "tokens": "float16",
    "token_scale": "float16",
    "views": "float32",
    "keys": "str",
    "labels": "int64",
    "valid": "uint8",
}
FILL_VALUES: dict[str, Any] = {
    "cls": 0, "tokens": 0, "token_scale": 0, "views": 0, "keys": "", "labels": -1, "valid": 0,
}  # fmt: skip


@dataclass(frozen=True)
class StoreLayout:
    """Rows, shards and array shapes of a store.

    ``num_rows`` N, ``shard_size`` rows per shard, ``stored_views`` V, ``dim`` D, ``num_tokens`` T,
    ``num_params`` P (view params per view), ``tokens``: whether the token array is kept;
    ``token_codec`` how (`cospress.store.codecs`: fp16, int8, pca) and ``token_dim`` the values kept
    per token (the teacher dim, or the projection's components for pca; 0 = the teacher dim).
    """

    num_rows: int
    shard_size: int
    stored_views: int
    dim: int
    num_tokens: int
    num_params: int
    tokens: bool
    token_codec: str = "fp16"
    token_dim: int = 0

    def __post_init__(self) -> None:
        if not self.token_dim:
            object.__setattr__(self, "token_dim", int(self.dim))

    @classmethod
    def from_manifest(cls, doc: dict) -> StoreLayout:
        """The layout recorded in an identity or a manifest."""
        return cls(
            num_rows=int(doc["num_rows"]),
            shard_size=int(doc["shard_size"]),
            stored_views=int(doc["num_views"]),
            dim=int(doc["dim"]),
            num_tokens=int(doc["num_tokens"]),
            num_params=int(doc["num_params"]),
            tokens=bool(doc["tokens"]),
            token_codec=codec_name(doc),
            token_dim=token_dim(doc),
        )

    def to_manifest(self) -> dict[str, Any]:
        """The layout fields of an identity, in their on-disk order: num_rows ... dtypes."""
        shapes = self.shapes()
        return {
            "num_rows": int(self.num_rows),
            "shard_size": int(self.shard_size),
            "num_views": int(self.stored_views),
            "dim": int(self.dim),
            "num_tokens": int(self.num_tokens),
            "num_params": int(self.num_params),
            "tokens": bool(self.tokens),
            "shapes": shapes,
            "dtypes": {n: self.dtype(n) for n in shapes},
        }

    def dtype(self, name: str) -> str:
        """The dtype of array ``name``: tokens are int8 in the int8 and pca codecs."""
        return "int8" if name == "tokens" and self.token_codec != "fp16" else DTYPES[name]

    def with_rows(self, num_rows: int) -> StoreLayout:
        """The same layout with another row count (a merged, appended or exported store)."""
        return dataclasses.replace(self, num_rows=int(num_rows))

    def shapes(self) -> dict[str, list[int]]:
        """Shape of every array: cls [N, V, D], tokens [N, V, T, token_dim] (only when kept),
        token_scale [N, V, T] (kept tokens of the int8 and pca codecs), views [N, V, P], keys, labels
        and valid [N]; in `ARRAY_NAMES` order."""
        n, v = self.num_rows, self.stored_views
        shapes = {
            "cls": [n, v, self.dim],
            "views": [n, v, self.num_params],
            "keys": [n],
            "labels": [n],
            "valid": [n],
        }
        if self.tokens:
            shapes["tokens"] = [n, v, self.num_tokens, self.token_dim]
            if self.token_codec != "fp16":
                shapes["token_scale"] = [n, v, self.num_tokens]
        return {name: shapes[name] for name in ARRAY_NAMES if name in shapes}

    def estimate_bytes(self) -> int:
        """Uncompressed bytes: ``N x V x (D x 2 + T x b)`` (float16 CLS, b bytes per token: 2 D for
        fp16, D + 2 for int8, k + 2 for pca) + views, keys, labels.

        Lossless compression gains only ~1.15x on float16 embeddings, so this is close to the size
        on disk. Keys are counted at 32 bytes each.
        """
        per_token = stored_bytes_per_token(self.token_codec, self.dim, self.token_dim)
        per_row_feat = self.stored_views * (
            self.dim * 2 + (self.num_tokens * per_token if self.tokens else 0)
        )
        per_row_other = self.stored_views * self.num_params * 4 + 8 + 1 + 32
        return int(self.num_rows) * (per_row_feat + per_row_other)

    @property
    def num_shards(self) -> int:
        return (self.num_rows + self.shard_size - 1) // self.shard_size

    def shard_rows(self, shard: int) -> tuple[int, int]:
        """Row range ``[start, stop)`` of one shard (the last one may be short)."""
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.num_rows)


def array_chunks(name: str, shape: list[int], shard_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(inner chunk, shard) shapes of one array: shards of ``shard_size`` rows along axis 0.

    Row arrays get one inner chunk per row so one row can be fetched by byte range; ``tokens``
    gets one inner chunk per (row, view) so reading a subset of views fetches only those views;
    the 1-D arrays (keys, labels, valid) get one inner chunk per shard.
    """
    shard = (shard_size, *shape[1:])
    if name in ("tokens", "token_scale"):
        chunk = (1, 1, *shape[2:])
    elif len(shape) > 1:
        chunk = (1, *shape[1:])
    else:
        chunk = (shard_size,)
    return chunk, shard
