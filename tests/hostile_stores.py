"""A corpus of crafted and corrupted stores: what a store from another team could hold.

`base_store` writes a small complete store with the real `StoreWriter` (int8 or pca tokens, keys that
match a folder of images, so stage 2 can open it); each entry of `HOSTILE` turns a copy of it into a
hostile store and says which words the one-line error must contain (None: the store is still sound
and every command must succeed). Most entries re-hash what they change, so the checksums agree and
only the reader's own checks stand between the store and the reader ("crafted"); the others are
plain corruption ("corrupted"), which `verify` must name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np
from PIL import Image

from cospress.data.sources import open_source
from cospress.data.views import PARAM_NAMES, ViewPolicy, sample_view_params
from cospress.store import StoreLayout, StoreWriter, make_identity
from cospress.store.codecs import Projection
from cospress.store.manifest import shard_file_key
from cospress.store.projection import codec_entry
from cospress.store.records import NEW, read_record, write_record
from cospress.store.shardio import ShardLayout, encode_shard

PARAMS = tuple(PARAM_NAMES)
N, SHARD, V, DT, T = 12, 5, 2, 8, 4
OUTSIDE = "/etc/hostname"  # a file outside every store; no reader may open it


def make_images(root: Path, n: int = N, prefix: str = "") -> str:
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"class{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        img = np.clip(rng.normal(120, 40, (24, 24, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"{prefix}img{i:03d}.png")
    return f"folder:{root}"


def base_store(path: Path, spec: str, codec: str = "int8") -> Path:
    """A complete store of N rows over the images of ``spec`` (tokens in ``codec``: int8 or pca)."""
    source = open_source(spec)
    policy = ViewPolicy()
    rng = np.random.default_rng(1)
    projection, comps = None, 0
    if codec == "pca":
        q, _ = np.linalg.qr(rng.normal(size=(DT, DT)))
        projection, comps = Projection(rng.normal(size=DT).astype(np.float32), q[:4].astype(np.float32)), 4
    ident = make_identity(
        teacher={"name": "fake", "fingerprint": "fp", "grid": [2, 2], "dim": DT, "input_size": 32},
        view_policy=policy.to_dict(), policy_fingerprint=policy.fingerprint(), k=V, center_view=False,
        seed=0, source=source.describe(), param_names=list(PARAMS), token_codec=codec_entry(codec, projection),
    )  # fmt: skip
    layout = StoreLayout(N, SHARD, V, DT, T, len(PARAMS), True, token_codec=codec, token_dim=comps)
    w = StoreWriter.open(path, ident, layout, overwrite=True, projection=projection)
    keys, labels = source.keys(), source.labels()
    for s in range(w.num_shards):
        a, b = w.shard_rows(s)
        views = np.stack([np.stack([sample_view_params(policy, 0, keys[i], v, 24, 24) for v in range(V)])
                          for i in range(a, b)])  # fmt: skip
        w.write_shard(
            s, cls=rng.normal(size=(b - a, V, DT)).astype(np.float16),
            tokens=rng.normal(size=(b - a, V, T, DT)).astype(np.float16), views=views,
            keys=keys[a:b], labels=np.asarray(labels[a:b]), valid=np.ones(b - a, np.uint8),
        )  # fmt: skip
    w.finalize()
    return path


# ---------------------------------------------------------------------------------------- helpers
def manifest(p: Path) -> dict:
    return read_record(p, NEW.manifest)


def save_manifest(p: Path, doc: dict, rehash: bool = True) -> None:
    """Write the manifest back; ``rehash``: every shard and metadata hash made to match the files
    (a crafted store: its checksums agree with what it holds)."""
    if rehash:
        for entry in doc["shards"]:
            for name in entry["sha256"]:
                f = p / shard_file_key(name, entry["shard"], len(doc["shapes"][name]))
                if f.is_file():
                    entry["sha256"][name] = hashlib.sha256(f.read_bytes()).hexdigest()
        for key in doc.get("metadata_sha256", {}):
            f = p / key
            if not key.startswith("/") and ".." not in key and f.is_file():
                doc["metadata_sha256"][key] = hashlib.sha256(f.read_bytes()).hexdigest()
    write_record(p, NEW.manifest, doc, NEW)


def edit_json(p: Path, key: str, edit: Callable[[dict], None]) -> None:
    doc = json.loads((p / key).read_text())
    edit(doc)
    (p / key).write_text(json.dumps(doc))
    save_manifest(p, manifest(p))


def edit_layout(p: Path, **fields: int) -> None:
    """Declare other layout fields (num_rows, dim, ...) in the manifest, its shapes and shard list
    consistent with them (the arrays' files unchanged)."""
    doc = manifest(p)
    doc.update(fields)
    layout = StoreLayout.from_manifest(doc)
    doc["shapes"] = layout.shapes()
    n, size = layout.num_rows, layout.shard_size
    shards = doc["shards"][: layout.num_shards]
    for i, entry in enumerate(shards):
        entry["rows"] = [i * size, min((i + 1) * size, n)]
    while len(shards) < layout.num_shards:
        shards.append(
            {
                **shards[-1],
                "shard": len(shards),
                "rows": [len(shards) * size, min((len(shards) + 1) * size, n)],
            }
        )
    doc["shards"] = shards
    doc.pop("padding", None)
    save_manifest(p, doc)


def rewrite_shard(p: Path, name: str, shard: int, values: np.ndarray) -> None:
    """Re-encode one shard file of a blosc array with ``values`` (its rows), checksums re-hashed."""
    meta = json.loads((p / name / "zarr.json").read_text())
    layout = ShardLayout.from_metadata(meta)
    key = shard_file_key(name, shard, len(meta["shape"]))
    (p / key).write_bytes(encode_shard(layout, values))
    save_manifest(p, manifest(p))


def read_shard_values(p: Path, name: str, shard: int) -> np.ndarray:
    from cospress.store import StoreReader

    start, stop = manifest(p)["shards"][shard]["rows"]
    return np.asarray(StoreReader(p)._arrays[name][start:stop])


def patch_index(p: Path, key: str, entry: int, offset: int | None = None, nbytes: int | None = None) -> None:
    """Change one (offset, nbytes) pair of a shard file's index, with a valid crc32c."""
    f = p / key
    blob = bytearray(f.read_bytes())
    meta = json.loads((p / key.split("/c/")[0] / "zarr.json").read_text())
    n = ShardLayout.from_metadata(meta).index_nbytes()
    idx = np.frombuffer(bytes(blob[-n:-4]), "<u8").reshape(-1, 2).copy()
    if offset is not None:
        idx[entry, 0] = offset
    if nbytes is not None:
        idx[entry, 1] = nbytes
    body = idx.astype("<u8").tobytes()
    blob[-n:] = body + struct.pack("<I", google_crc32c.value(body))
    f.write_bytes(bytes(blob))
    save_manifest(p, manifest(p))


def patch_blosc_nbytes(p: Path, key: str, nbytes: int) -> None:
    """Make the blosc header of the first chunk of a shard file claim ``nbytes`` decoded bytes."""
    f = p / key
    blob = bytearray(f.read_bytes())
    meta = json.loads((p / key.split("/c/")[0] / "zarr.json").read_text())
    n = ShardLayout.from_metadata(meta).index_nbytes()
    idx = np.frombuffer(bytes(blob[-n:-4]), "<u8").reshape(-1, 2)
    off = int(idx[idx[:, 0] != np.uint64(2**64 - 1)][:, 0].min())
    struct.pack_into("<I", blob, off + 4, nbytes)
    f.write_bytes(bytes(blob))
    save_manifest(p, manifest(p))


def _scale(value: float) -> Callable[[Path], None]:
    def mutate(p: Path) -> None:
        s = read_shard_values(p, "token_scale", 1)
        s[0, 1, 2] = value
        rewrite_shard(p, "token_scale", 1, s)

    return mutate


def _symlink(key: str, target: str) -> Callable[[Path], None]:
    def mutate(p: Path) -> None:
        (p / key).unlink()
        os.symlink(target, p / key)

    return mutate


def _unlink(key: str) -> Callable[[Path], None]:
    return lambda p: (p / key).unlink()


def _truncate(key: str, size: int) -> Callable[[Path], None]:
    def mutate(p: Path) -> None:
        with open(p / key, "r+b") as f:
            f.truncate(size)

    return mutate


def _metadata_key(key: str) -> Callable[[Path], None]:
    def mutate(p: Path) -> None:
        doc = manifest(p)
        doc["metadata_sha256"][key] = "0" * 64
        save_manifest(p, doc, rehash=False)

    return mutate


def _interrupted_append(p: Path) -> None:
    """What `open_append` leaves when the process dies right after it: a grown identity and arrays."""
    ident = read_record(p, NEW.identity)
    ident["num_rows"] = 2 * N
    ident["shapes"] = StoreLayout.from_manifest(ident).shapes()
    write_record(p, NEW.identity, ident, NEW)
    for name in ident["shapes"]:
        doc = json.loads((p / name / "zarr.json").read_text())
        doc["shape"][0] = 2 * N
        (p / name / "zarr.json").write_text(json.dumps(doc, indent=2))


def _projection_shape(p: Path) -> None:
    edit_json(p, "token_projection/basis/zarr.json", lambda d: d.update(shape=[1 << 20, 1 << 20],
                                                                         chunk_grid={"name": "regular", "configuration": {"chunk_shape": [1 << 20, 1 << 20]}}))  # fmt: skip


def _dir_instead(key: str) -> Callable[[Path], None]:
    def mutate(p: Path) -> None:
        (p / key).unlink()
        (p / key).mkdir()

    return mutate


@dataclass(frozen=True)
class Hostile:
    """One hostile store: ``mutate(path)`` on a copy of a base store (``base``: int8 or pca), and the
    words its one-line error must hold (``expect``; None: still a sound store, commands succeed).
    ``crafted``: its checksums agree with what it holds (only the reader's own checks catch it)."""

    name: str
    mutate: Callable[[Path], None]
    expect: tuple[str, ...] | None
    base: str = "int8"

    @property
    def crafted(self) -> bool:
        return self.name in CRAFTED


CRAFTED = {
    "scale-nan", "scale-inf", "scale-negative", "huge-shard-consistent", "dtype-float64", "fill-value-list",
    "fill-value-nan", "fill-value-label", "codec-gzip", "index-huge-nbytes", "index-past-end", "index-labels-huge",
    "blosc-claims-2gib", "blosc-labels-claims", "pca-projection-shape", "manifest-dtype",
}  # fmt: skip
CLS0, CLS1, TOK0, LAB1, KEYS0 = "cls/c/0/0/0", "cls/c/1/0/0", "tokens/c/0/0/0/0", "labels/c/1", "keys/c/0"
HOSTILE = [
    Hostile("sound", lambda p: None, None),
    Hostile("missing-cls-shard", _unlink(CLS1), ("cls/c/1/0/0", "missing")),
    Hostile("missing-labels-shard", _unlink(LAB1), ("labels/c/1", "missing")),
    Hostile("missing-keys-shard", _unlink(KEYS0), ("keys/c/0", "missing")),
    Hostile("truncated-tokens", _truncate(TOK0, 100), ("tokens/c/0/0/0/0",)),
    Hostile("truncated-to-3-bytes", _truncate(CLS0, 3), ("cls/c/0/0/0",)),
    Hostile("scale-nan", _scale(float("nan")), ("token_scale", "nan")),
    Hostile("scale-inf", _scale(float("inf")), ("token_scale", "inf")),
    Hostile("scale-negative", _scale(-2.0), ("token_scale", "-2")),
    Hostile("key-dotdot", _metadata_key("../../etc/hostname"), ("../../etc/hostname", "outside")),
    Hostile("key-absolute", _metadata_key("/etc/hostname"), ("/etc/hostname", "outside")),
    Hostile("key-dev-zero", _metadata_key("/dev/zero"), ("/dev/zero", "outside")),
    Hostile(
        "files-outside",
        lambda p: save_manifest(
            p,
            {
                **manifest(p),
                "shards": [{**e, "files": {**e["files"], "cls": "../../x"}} for e in manifest(p)["shards"]],
            },
            rehash=False,
        ),  # fmt: skip
        ("files", "outside"),
    ),
    Hostile("symlink-outside", _symlink(CLS0, OUTSIDE), ("cls/c/0/0/0",)),
    Hostile("symlink-dev-zero", _symlink(LAB1, "/dev/zero"), ("labels/c/1",)),
    Hostile("shard-file-is-a-folder", _dir_instead(CLS1), ("cls/c/1/0/0",)),
    Hostile("huge-rows", lambda p: edit_layout(p, num_rows=1 << 40, shard_size=1 << 40), ("inner chunks",)),
    Hostile("huge-dim", lambda p: edit_layout(p, dim=1 << 30), ("inner chunks",)),
    Hostile("huge-views", lambda p: edit_layout(p, num_views=1 << 24), ("inner chunks",)),
    Hostile("huge-shard-consistent", lambda p: _huge_shard(p), ("cls/c/0/0/0",)),
    Hostile(
        "dtype-float64",
        lambda p: edit_json(p, "cls/zarr.json", lambda d: d.update(data_type="float64")),
        ("cls/zarr.json", "data_type"),
    ),  # fmt: skip
    Hostile(
        "manifest-dtype",
        lambda p: save_manifest(p, {**manifest(p), "dtypes": {**manifest(p)["dtypes"], "cls": "float64"}}),
        ("dtypes",),
    ),  # fmt: skip
    Hostile(
        "fill-value-list",
        lambda p: edit_json(p, "labels/zarr.json", lambda d: d.update(fill_value=[1, 2])),
        ("labels",),
    ),  # fmt: skip
    Hostile(
        "fill-value-nan",
        lambda p: edit_json(p, "cls/zarr.json", lambda d: d.update(fill_value="NaN")),
        ("cls/zarr.json", "fill_value"),
    ),
    Hostile(
        "fill-value-label",
        lambda p: edit_json(p, "labels/zarr.json", lambda d: d.update(fill_value=3)),
        ("labels/zarr.json", "fill_value"),
    ),
    Hostile(
        "codec-gzip",
        lambda p: edit_json(
            p,
            "views/zarr.json",
            lambda d: d["codecs"][0]["configuration"].update(
                codecs=[
                    {"name": "bytes", "configuration": {"endian": "little"}},
                    {"name": "gzip", "configuration": {"level": 1}},
                ]
            ),
        ),
        ("views",),
    ),  # fmt: skip
    Hostile("index-huge-nbytes", lambda p: patch_index(p, CLS0, 0, nbytes=1 << 40), ("cls/c/0/0/0", "index")),
    Hostile("index-past-end", lambda p: patch_index(p, CLS0, 1, offset=1 << 50), ("cls/c/0/0/0", "index")),
    Hostile("index-labels-huge", lambda p: patch_index(p, LAB1, 0, nbytes=1 << 40), ("labels/c/1", "index")),
    Hostile("index-crc-bad", lambda p: _flip_last(p, CLS0), ("cls/c/0/0/0",)),
    Hostile(
        "blosc-claims-2gib", lambda p: patch_blosc_nbytes(p, CLS0, (1 << 31) - 1), ("cls/c/0/0/0", "blosc")
    ),
    Hostile(
        "blosc-labels-claims", lambda p: patch_blosc_nbytes(p, LAB1, (1 << 31) - 1), ("labels/c/1", "blosc")
    ),
    Hostile("manifest-not-json", lambda p: (p / NEW.manifest).write_text("{not json"), ("not valid JSON",)),
    Hostile("no-manifest", _unlink(NEW.manifest), ("no manifest",)),
    Hostile("interrupted-append", _interrupted_append, ("append", "interrupted")),
    Hostile("pca-sound", lambda p: None, None, "pca"),
    Hostile("pca-projection-shape", _projection_shape, ("token_projection",), "pca"),
    Hostile("pca-projection-missing", _unlink("token_projection/basis/c/0/0"), ("token_projection",), "pca"),
]


def _flip_last(p: Path, key: str) -> None:
    blob = bytearray((p / key).read_bytes())
    blob[-1] ^= 0xFF
    (p / key).write_bytes(bytes(blob))


def _huge_shard(p: Path) -> None:
    """A consistent store (manifest, identity and every zarr.json agree) that declares 2**22 rows
    in one shard: its files are a few KB. Only the files' real sizes give it away."""
    rows = 1 << 22
    edit_layout(p, num_rows=rows, shard_size=rows)
    doc = manifest(p)
    for name, shape in doc["shapes"].items():
        meta = json.loads((p / name / "zarr.json").read_text())
        meta["shape"] = shape
        meta["chunk_grid"]["configuration"]["chunk_shape"] = [rows, *shape[1:]]
        if len(shape) == 1:
            meta["codecs"][0]["configuration"]["chunk_shape"] = [rows]
        (p / name / "zarr.json").write_text(json.dumps(meta))
    doc.pop("arrays", None)
    save_manifest(p, doc)


def build(hostile: Hostile, bases: dict[str, Path], out: Path) -> Path:
    """A fresh copy of the base store made hostile (symlinks kept as links)."""
    shutil.copytree(bases[hostile.base], out, symlinks=True)
    hostile.mutate(out)
    return out
