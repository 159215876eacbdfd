"""``extract-teacher --add-views N --to STORE``: write views K .. K+N-1 of every row as a view extension.

The extension is a complete store of its own under ``STORE/extensions/`` (:mod:`cospress.store.extensions`),
extracted by the ordinary stage 1 runner with the view indices shifted by K: the keyed RNG draws
exactly the views a K+N store of the same seed holds. The run's teacher, view policy, seed and images
must be the store's (refused in one line otherwise); shard size, tokens and token codec are taken
from the store. When the extension is complete it is added to the store's extension index.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cospress.errors import ConfigError, StoreError
from cospress.extract.config import ExtractConfig
from cospress.store import extensions as ext
from cospress.store.remote import is_local
from cospress.store.row_order import store_row_order
from cospress.utils import atomic_write_json


@dataclass
class Extending:
    """The store being extended and where this extension goes."""

    root: Path
    path: str  # relative to root
    first_view: int
    views: int
    manifest: dict[str, Any]

    def check(self, identity: dict[str, Any]) -> None:
        """Refuse a run whose teacher, view policy, seed, images or view params are not the store's."""
        ext.refuse_mismatch(self.manifest, identity, f"this run (--add-views to {self.root})", ext.RUN_FIELDS)

    def record(self) -> dict[str, Any]:
        """The identity's "extension" entry."""
        return {"first_view": self.first_view, "views": self.views,
                "base_manifest_sha256": ext.manifest_sha256(self.manifest)}  # fmt: skip

    def register(self, manifest: dict[str, Any]) -> None:
        group = self.root / ext.FOLDER / "zarr.json"
        if not group.exists():  # a Zarr group node, so the store stays one Zarr hierarchy
            atomic_write_json(group, {"zarr_format": 3, "node_type": "group", "attributes": {}})
        ext.register(
            self.root,
            ext.ViewExtension(self.path, self.first_view, self.views, ext.manifest_sha256(manifest)),
        )


def prepare_extension(cfg: ExtractConfig) -> tuple[ExtractConfig, Extending]:
    """The config that extracts the extension (out = its folder, views = N) and what it extends."""
    from cospress.store.reader import StoreReader

    if not is_local(str(cfg.to)):
        raise ConfigError(
            "--add-views writes next to a local store: --to must be a local path (publish it after)"
        )
    reader = StoreReader(cfg.to)
    if reader.paths.legacy:
        raise StoreError(
            f"{reader.display} is a schema 1.x store: view extensions need schema 2.0 (re-extract it)"
        )
    codec = reader.layout.token_codec
    if codec == "pca":
        raise StoreError(f"{reader.display} keeps pca tokens: view extensions take fp16 or int8 stores")
    first = int(reader.manifest["k"]) + sum(e.views for e in reader.extensions)
    root = Path(cfg.to).resolve()
    path = ext.folder_name(first, cfg.add_views)
    out = dataclasses.replace(
        cfg, out=str(root / path), views=cfg.add_views, add_views=0, to=None,
        shard_size=reader.shard_size, tokens=reader.has_tokens, token_codec=codec, center_view=False,
        row_order=store_row_order(reader.manifest),
    )  # fmt: skip
    return out, Extending(root, path, first, cfg.add_views, reader.manifest)
