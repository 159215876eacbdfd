"""Export a store to WebDataset tar shards and import it back, exactly.

One sample per store row (append padding left out), in row order::

    <key>.cls.npy      float16 [V, Dt]        (np.save, no pickle)
    <key>.tokens.npy   float16 [V, T, Dt]     only when the store keeps tokens; as stored: int8
                                              [V, T, token_dim] in the int8 and pca codecs
    <key>.token_scale.npy  float16 [V, T]     the int8 and pca codecs only
    <key>.json         {"key", "label", "valid", "views": [[P floats] x V], "reason"?}

``<key>`` is the store key percent-encoded (`encode_key`: ``.`` -> ``%2E``, ``/`` -> ``%2F``, ...),
since WebDataset splits member names at the first dot; the json keeps the original key.
``cospress-wds.json`` (written last) holds the store identity, each tar's name, sample count and
sha256, and the skipped inputs, so `import_wds` rebuilds a store of the same identity (a pca store's
projection travels as ``token_projection-mean.npy`` and ``-basis.npy``, named in the sidecar). Import never
unpickles (each ``.npy`` header is read and checked against the identity's shape and float16 before
any data), reads members in memory (nothing is extracted to disk), refuses a member larger than a
sample of the store can hold before reading it, and refuses absolute paths, ``..`` and non-regular
members.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import numpy as np

import cospress
from cospress.command_config import ExportWdsConfig
from cospress.errors import StoreError
from cospress.store import manifest as mf
from cospress.store.layout import StoreLayout
from cospress.store.merge import real_rows
from cospress.store.reader import StoreReader
from cospress.store.schema import validate_identity
from cospress.store.wds_files import (
    load_npy,
    member_limits,
    npy_bytes,
    read_projection_files,
    safe_member,
    write_projection_files,
)
from cospress.store.writer import StoreWriter, _looks_like_store
from cospress.utils import atomic_write_json, sha256_file

log = logging.getLogger(__name__)

SIDECAR = "cospress-wds.json"
WDS_FORMAT = "cospress-wds"
WDS_VERSION = 2  # 2: token codecs (token_scale members, the projection files); 1 still imports
_SHARD_NAME = re.compile(r"^[A-Za-z0-9_-]+\.tar$")


def encode_key(key: str) -> str:
    """A reversible, dot-free and slash-free form of a store key, for ``__key__``."""
    return quote(key, safe="").replace(".", "%2E").replace("~", "%7E")


def decode_key(encoded: str) -> str:
    """Inverse of `encode_key`."""
    return unquote(encoded)


def _sample(data: dict[str, Any], i: int, reasons: dict[str, str]) -> dict[str, Any]:
    """The WebDataset sample of row ``i`` of a `StoreReader.read_rows` result."""
    key = data["keys"][i]
    meta: dict[str, Any] = {
        "key": key,
        "label": int(data["labels"][i]),
        "valid": bool(data["valid"][i]),
        "views": data["views"][i].astype(np.float32).tolist(),
    }
    if not data["valid"][i]:
        meta["reason"] = reasons.get(key, "skipped")
    sample = {
        "__key__": encode_key(key),
        "cls.npy": npy_bytes(data["cls"][i]),
        "json": json.dumps(meta).encode(),
    }
    if data["tokens"] is not None:
        sample["tokens.npy"] = npy_bytes(data["tokens"][i])
    if data.get("token_scale") is not None:
        sample["token_scale.npy"] = npy_bytes(data["token_scale"][i])
    return sample


def export_wds(
    store: str,
    out: str | os.PathLike,
    *,
    samples_per_shard: int = ExportWdsConfig.samples_per_shard,
    cache_dir: str | None = None,
    storage_options: dict | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Write ``out/shard-NNNNNN.tar`` + ``out/cospress-wds.json``; returns the sidecar dict."""
    import webdataset as wds

    if samples_per_shard < 1:
        raise StoreError(f"--samples-per-shard must be at least 1, got {samples_per_shard}")
    reader = StoreReader(store, cache_dir=cache_dir, storage_options=storage_options)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise StoreError(f"{out} exists and is not empty; choose an empty --out folder")
    out.mkdir(parents=True, exist_ok=True)
    m = reader.manifest
    rows = real_rows(reader)
    reasons = {s["key"]: s["reason"] for s in m.get("skipped", [])}
    pattern = str(out / "shard-%06d.tar")
    counts: dict[str, int] = {}  # samples per tar, in writing order
    with wds.ShardWriter(pattern, maxcount=samples_per_shard, verbose=0, mtime=0.0) as sink:
        for b in range(0, len(rows), reader.shard_size):
            data = reader.read_rows(rows[b : b + reader.shard_size], raw=True)  # tokens as stored
            for i in range(len(data["keys"])):
                sink.write(_sample(data, i, reasons))
                counts[Path(sink.fname).name] = counts.get(Path(sink.fname).name, 0) + 1
            if progress is not None:
                progress(min(b + reader.shard_size, len(rows)), len(rows))
    sidecar = {
        "format": WDS_FORMAT,
        "version": WDS_VERSION,
        "identity": mf.full_identity(_run_identity(reader), reader.layout.with_rows(len(rows))),
        "samples": len(rows),
        "shards": [{"name": n, "samples": c, "sha256": sha256_file(out / n)} for n, c in counts.items()],
        "skipped": [s for s in m.get("skipped", [])],
        "exported_from": {"url": reader.display, "keys_sha256": m.get("keys_sha256")},
        "cospress_version": cospress.__version__,
    }
    if reader.projection is not None:
        sidecar["projection"] = write_projection_files(out, reader.projection)
    atomic_write_json(out / SIDECAR, sidecar)
    log.info("exported %s: %d samples in %d tar shards to %s", reader.display, len(rows), len(counts), out)
    return sidecar


def _run_identity(reader: StoreReader) -> dict[str, Any]:
    """The exported run identity: with view extensions, K counts their views (rows hold all of them)."""
    ident = mf.run_identity(reader.manifest)
    if reader.extensions:
        ident = {**ident, "k": reader.stored_views - int(bool(ident.get("center_view")))}
    return ident


# ---- import ---------------------------------------------------------------------------------------
def _read_sidecar(src: Path) -> dict:
    path = src / SIDECAR
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(
            f"{src} has no {SIDECAR}: not a cospress WebDataset export, or an unfinished one; export it again"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{path} is not valid JSON ({e}); export the store again") from None
    problem = None
    if not isinstance(doc, dict):
        problem = "it is not a JSON object"
    elif doc.get("format") != WDS_FORMAT:
        problem = f"'format' is not {WDS_FORMAT!r}"
    elif doc.get("version") not in (1, WDS_VERSION):
        problem = f"'version' {str(doc.get('version'))[:20]} is not {WDS_VERSION}: use a matching cospress"
    elif not isinstance(doc.get("shards"), list) or not isinstance(doc.get("samples"), int):
        problem = "'shards' must be a list and 'samples' an integer"
    elif not isinstance(doc.get("skipped", []), list):
        problem = "'skipped' must be a list"
    else:
        for i, s in enumerate(doc["shards"]):
            ok = (
                isinstance(s, dict)
                and isinstance(s.get("name"), str)
                and _SHARD_NAME.match(s["name"])
                and isinstance(s.get("samples"), int)
                and isinstance(s.get("sha256"), str)
            )
            if not ok:
                problem = f"shards[{i}] needs a plain tar file 'name', 'samples' and 'sha256'"
                break
    if problem:
        raise StoreError(f"{path} is malformed: {problem}; export the store again")
    validate_identity(doc.get("identity"), f"{path} (identity)")
    if doc["identity"]["num_rows"] != doc["samples"]:
        raise StoreError(f"{path} is malformed: 'samples' differs from the identity's num_rows; export again")
    return doc


def _samples(tar_path: Path, limits: dict[str, int]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(encoded key, {suffix: bytes}) per sample, in member order, read in memory: only the members
    named in ``limits``, each refused before it is read when larger than its limit."""
    key: str | None = None
    members: dict[str, bytes] = {}
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            safe_member(member, tar_path)
            base = member.name.rsplit("/", 1)[-1]
            if "." not in base:
                raise StoreError(f"{tar_path}: member {base[:80]!r} has no suffix; not a cospress export")
            k, suffix = base.split(".", 1)
            if k != key:
                if key is not None:
                    yield key, members
                key, members = k, {}
            if suffix not in limits:
                continue  # not a member of a cospress export: never read
            if member.size > limits[suffix]:
                raise StoreError(
                    f"{tar_path}: member {base[:80]!r} is {member.size} bytes, more than the {limits[suffix]} "
                    "a sample of this store can hold; refusing to import it: export the store again"
                )
            f = tar.extractfile(member)
            members[suffix] = f.read() if f is not None else b""
    if key is not None:
        yield key, members


class _ShardFiller:
    """Collects imported rows and writes each store shard once it is full."""

    def __init__(self, writer: StoreWriter) -> None:
        self.writer = writer
        self.shard, self.rows = 0, []
        self.done = writer.committed_shards()

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        start, stop = self.writer.shard_rows(self.shard)
        if len(self.rows) == stop - start:
            if self.shard not in self.done:
                self._write()
            self.shard, self.rows = self.shard + 1, []

    def _write(self) -> None:
        r = self.rows
        tokens = np.stack([x["tokens"] for x in r]) if self.writer.identity["tokens"] else None
        scale = np.stack([x["token_scale"] for x in r]) if r[0].get("token_scale") is not None else None
        self.writer.write_shard(
            self.shard,
            cls=np.stack([x["cls"] for x in r]),
            tokens=tokens,
            views=np.stack([x["views"] for x in r]),
            keys=[x["key"] for x in r],
            labels=np.array([x["label"] for x in r], np.int64),
            valid=np.array([x["valid"] for x in r], np.uint8),
            skipped=[{"key": x["key"], "reason": x["reason"]} for x in r if not x["valid"]],
            token_scale=scale,
        )


def _parse_sample(enc: str, files: dict[str, bytes], ident: dict, where: str) -> dict[str, Any]:
    v, dim, t, p = ident["num_views"], ident["dim"], ident["num_tokens"], ident["num_params"]
    layout = StoreLayout.from_manifest(ident)
    lossy = ident["tokens"] and layout.token_codec != "fp16"
    need = {"cls.npy", "json"} | ({"tokens.npy"} if ident["tokens"] else set())
    need |= {"token_scale.npy"} if lossy else set()
    if not need <= set(files):
        raise StoreError(f"{where}: sample {enc[:60]!r} lacks {sorted(need - set(files))}; export again")
    try:
        meta = json.loads(files["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{where}: sample {enc[:60]!r} has invalid json ({e}); export again") from None
    ok = (
        isinstance(meta, dict)
        and isinstance(meta.get("key"), str)
        and isinstance(meta.get("label"), int)
        and isinstance(meta.get("valid"), bool)
        and isinstance(meta.get("views"), list)
    )
    if not ok:
        raise StoreError(f"{where}: sample {enc[:60]!r} json needs key, label, valid, views; export again")
    if decode_key(enc) != meta["key"]:
        raise StoreError(f"{where}: sample {enc[:60]!r} does not match its json key; export again")
    views = np.asarray(meta["views"], dtype=np.float32)
    if views.shape != (v, p):
        raise StoreError(f"{where}: sample {enc[:60]!r} has views {list(views.shape)}, expected {[v, p]}")
    return {
        "key": meta["key"],
        "label": meta["label"],
        "valid": meta["valid"],
        "reason": str(meta.get("reason", "skipped")),
        "views": views,
        "cls": load_npy(files["cls.npy"], [v, dim], f"{where}: {enc[:60]}.cls.npy"),
        "tokens": load_npy(
            files["tokens.npy"],
            [v, t, layout.token_dim],
            f"{where}: {enc[:60]}.tokens.npy",
            "|i1" if lossy else "<f2",
        )
        if ident["tokens"]
        else None,  # fmt: skip
        "token_scale": load_npy(files["token_scale.npy"], [v, t], f"{where}: {enc[:60]}.token_scale.npy")
        if lossy
        else None,
    }


def import_wds(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Rebuild a store from an `export_wds` folder (tars checked against their sha256); returns its manifest.

    ``overwrite`` of an existing store builds the new one beside it and swaps the two only once every
    sample has been read and the manifest written: a bad sample leaves the old store as it was.
    """
    src, out = Path(src), Path(out)
    doc = _read_sidecar(src)
    for s in doc["shards"]:
        path = src / s["name"]
        if not path.is_file():
            raise StoreError(f"{path} is missing; copy the whole export folder")
        if sha256_file(path) != s["sha256"]:
            raise StoreError(
                f"{path} does not match its sha256 in {SIDECAR}: corrupted; copy or export it again"
            )
    if not (overwrite and out.is_dir() and any(out.iterdir())):
        return _import_into(src, doc, out, overwrite, progress)
    if not _looks_like_store(out):
        raise StoreError(
            f"{out} exists and is not a cospress store; refusing to replace it with --overwrite: "
            "choose another store path"
        )
    beside = out.parent / f".{out.name}.import-{os.getpid()}"
    shutil.rmtree(beside, ignore_errors=True)
    try:
        manifest = _import_into(src, doc, beside, False, progress)
    except BaseException:
        shutil.rmtree(beside, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.replaced-{os.getpid()}"
    os.replace(out, old)  # the swap: two renames in one folder
    os.replace(beside, out)
    shutil.rmtree(old, ignore_errors=True)
    log.info("overwrite: replaced the store at %s", out)
    return manifest


def _import_into(
    src: Path, doc: dict, out: Path, overwrite: bool, progress: Callable[[int, int], None] | None
) -> dict[str, Any]:
    """Write the store of the checked export ``src`` (sidecar ``doc``) at ``out``."""
    ident = doc["identity"]
    layout = StoreLayout.from_manifest(ident)
    projection = read_projection_files(src, doc)
    writer = StoreWriter.open(
        out, mf.run_identity(ident), layout, overwrite=overwrite, create=True, projection=projection
    )
    filler = _ShardFiller(writer)
    seen: set[str] = set()
    count = 0
    for s in doc["shards"]:
        n = 0
        for enc, files in _samples(src / s["name"], member_limits(ident)):
            row = _parse_sample(enc, files, ident, str(src / s["name"]))
            if row["key"] in seen:
                raise StoreError(f"{src}: key {row['key'][:80]!r} appears twice; export the store again")
            seen.add(row["key"])
            if count >= doc["samples"]:
                raise StoreError(f"{src} holds more samples than {SIDECAR} lists; export the store again")
            filler.add(row)
            n += 1
            count += 1
            if progress is not None:
                progress(count, doc["samples"])
        if n != s["samples"]:
            raise StoreError(f"{src / s['name']} holds {n} samples, {SIDECAR} says {s['samples']}")
    if count != doc["samples"]:
        raise StoreError(f"{src} holds {count} samples, {SIDECAR} says {doc['samples']}; export again")
    manifest = writer.finalize(extra={"imported_from": str(src), "cospress_version": cospress.__version__})
    log.info("imported %d samples from %s", count, src)
    return manifest
