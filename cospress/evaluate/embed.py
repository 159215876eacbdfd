"""Embeddings for evaluation: embed rows of a source with a model, cache the result; a store's bank.

Embedding = eval transform (:mod:`cospress.evaluate.images`) -> model -> CLS -> L2 normalisation,
and beside it the mean patch token (raw, for the linear probe) when the model has tokens (a CNN's
tokens are its spatial map). Results are cached on disk under a key of the cache version (2: CLS +
mean patch; version-1 entries held CLS only and are never read), the model fingerprint, the
source's keys hash, the rows, the transform, the device type, the precision and any corruption. With ``decode="device"`` (or auto / gpu on CUDA) the images are
decoded and resized in batches on the compute device. Corrupted inputs (robustness) always take
the CPU path: the corruptions work on PIL images.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from cospress.data.device_decode import EncodedBatch, decode_batch, resolve_decode
from cospress.data.sources import open_source
from cospress.errors import ConfigError
from cospress.evaluate.config import DEFAULT_CACHE_DIR, EvalConfig
from cospress.evaluate.images import EvalImages, collate_encoded, eval_transform_tensor
from cospress.evaluate.knn import l2_normalize
from cospress.evaluate.labels import ClassMap
from cospress.evaluate.ood import HELDOUT_SET, parse_ood_specs
from cospress.runtime import autocast, autocast_dtype, dtype_name
from cospress.store.manifest import class_names
from cospress.store.reader import StoreReader
from cospress.utils import atomic_write_bytes, atomic_write_json, npy_bytes, redact_text, sha256_json

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: <key>.npy (CLS) + <key>.patch.npy (mean patch token, when the model has tokens)


@dataclass
class Embeddings:
    """features: [N, D] float32, L2-normalised (zeros where invalid); valid: [N] bool; rows: [N] source rows;
    mean_patch: [N, D] float32 mean of the patch tokens (not normalised; zeros where invalid), None
    when the model gives no tokens."""

    features: np.ndarray
    valid: np.ndarray
    rows: np.ndarray
    errors: dict[int, str] = field(default_factory=dict)  # source row -> why it was skipped
    cache_hit: bool = False
    seconds: float = 0.0
    mean_patch: np.ndarray | None = None


def _cache_key(
    model: Any,
    source: Any,
    rows: np.ndarray,
    crop_pct: float,
    extra: dict,
    decode: str = "cpu",
    compute: tuple[str, str] = ("cpu", "float32"),
) -> str:
    """The cache name of an embedding; compute = (device type, precision actually used)."""
    desc = source.describe()
    transform = {"size": model.input_size, "crop_pct": crop_pct, "resize": "bicubic-short"}
    if decode != "cpu":  # device-decoded pixels differ slightly: never mixed with CPU-path caches
        transform["decode"] = decode
    return sha256_json(
        {
            "version": CACHE_VERSION,
            "model": model.fingerprint(),
            "source_keys": desc.get("keys_sha256"),
            "source_count": len(source),
            "rows": sha256_json(rows.tolist()),
            "transform": transform,
            "device": compute[0],  # bf16 and fp32, CPU and CUDA embeddings differ: never mixed
            "precision": compute[1],
            **extra,
        }
    )


def embed_source(
    model: Any,
    source: Any,
    rows: Sequence[int] | np.ndarray | None = None,
    *,
    batch_size: int = 256,
    workers: int = 0,
    device: torch.device | str = "cpu",
    precision: str = "auto",
    crop_pct: float = 0.875,
    cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR,
    corruption: str | None = None,
    severity: int = 0,
    seed: int = 0,
    decode: str = "cpu",
) -> Embeddings:
    """L2-normalised CLS embeddings of `rows` of a source (all rows by default) and their mean patch
    tokens (when the model has tokens), cached on disk.

    Inputs that fail to decode are skipped (valid False, reason in `errors`). cache_dir None = no cache.
    decode: cpu (workers decode with PIL), device / gpu (batched on `device`), auto (gpu on CUDA).
    """
    device = torch.device(device)
    decode = resolve_decode(decode, device)
    if corruption and severity:
        decode = "cpu"  # corruptions are PIL operations
    rows = np.arange(len(source)) if rows is None else np.asarray(rows, dtype=np.int64)
    extra = {"corruption": corruption, "severity": severity, "seed": seed} if corruption and severity else {}
    cache = None
    if cache_dir is not None:
        dtype = autocast_dtype(precision, device)
        compute = (device.type, dtype_name(dtype))
        key = _cache_key(model, source, rows, crop_pct, extra, decode, compute)
        cache = Path(cache_dir).expanduser() / key
        if cache.with_suffix(".json").is_file() and cache.with_suffix(".npy").is_file():
            return _load_cached(cache, rows, source)
    start = time.perf_counter()
    feats, patch, errors = _run(
        model, source, rows, batch_size, workers, device, precision, crop_pct, corruption, severity, seed,
        decode,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    valid = np.array([int(r) not in errors for r in rows], dtype=bool)
    log.info(
        "embedded %d rows of %s in %.1f s (%.0f images/s, %d skipped)",
        len(rows), source.shown, seconds, len(rows) / max(seconds, 1e-9), len(errors),
    )  # fmt: skip
    if cache is not None:
        if patch is not None:  # written before the .npy and .json that make an entry a hit
            atomic_write_bytes(cache.with_suffix(".patch.npy"), npy_bytes(patch))
        atomic_write_bytes(cache.with_suffix(".npy"), npy_bytes(feats))
        meta = {"spec": source.shown, "rows": len(rows), "mean_patch": patch is not None}
        atomic_write_json(
            cache.with_suffix(".json"), {**meta, "errors": {str(k): v for k, v in errors.items()}}
        )
    return Embeddings(feats, valid, rows, errors, seconds=seconds, mean_patch=patch)


def _load_cached(cache: Path, rows: np.ndarray, source: Any) -> Embeddings:
    """The embeddings of the cache entry ``cache`` (a path without suffix) for ``rows``."""
    meta = json.loads(cache.with_suffix(".json").read_text())
    feats = np.load(cache.with_suffix(".npy"))
    patch = np.load(cache.with_suffix(".patch.npy")) if meta.get("mean_patch") else None
    log.info("embedding cache hit: %s (%d rows of %s)", cache.name[:16], len(rows), source.shown)
    errors = {int(k): v for k, v in meta["errors"].items()}
    valid = np.array([int(r) not in errors for r in rows], dtype=bool)
    return Embeddings(feats, valid, rows, errors, cache_hit=True, mean_patch=patch)


def _device_batch(
    encoded: EncodedBatch, size: int, crop_pct: float, device: torch.device
) -> tuple[torch.Tensor, list[str]]:
    """Decode + eval-transform a packed batch on `device`: (uint8 [B, 3, S, S], errors [B])."""
    images, errors = decode_batch(encoded, device)
    blank = torch.zeros(3, size, size, dtype=torch.uint8, device=device)
    out = [blank if img is None else eval_transform_tensor(img, size, crop_pct) for img in images]
    return torch.stack(out), errors


def _run(
    model, source, rows, batch_size, workers, device, precision, crop_pct, corruption, severity, seed,
    decode="cpu",
):  # fmt: skip
    on_device = decode == "device"
    dataset = EvalImages(
        source, rows.tolist(), model.input_size, crop_pct, corruption, severity, seed, decode
    )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        shuffle=False,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        collate_fn=collate_encoded if on_device else None,
    )
    dtype = autocast_dtype(precision, device)
    feats = np.zeros((len(rows), model.dim), dtype=np.float32)
    patch: np.ndarray | None = None  # [N, D] mean patch token, allocated when the model gives tokens
    errors: dict[int, str] = {}
    with torch.inference_mode(), autocast(device, dtype):
        for pos, *batch in loader:
            if on_device:
                images, errs = _device_batch(batch[0], model.input_size, crop_pct, device)
            else:
                images, errs = batch[0].to(device, non_blocking=True), batch[1]
            out = model(images)
            feats[pos.numpy()] = out.cls.float().cpu().numpy()
            if out.tokens.shape[1] > 0:
                patch = np.zeros_like(feats) if patch is None else patch
                patch[pos.numpy()] = out.tokens.float().mean(1).cpu().numpy()
            for p, e in zip(pos.tolist(), errs, strict=True):
                if e:
                    errors[int(rows[p])] = e
    feats = l2_normalize(feats)
    for r in errors:
        feats[np.flatnonzero(rows == r)] = 0.0
        if patch is not None:
            patch[np.flatnonzero(rows == r)] = 0.0
    return feats, patch, errors


def bank_from_store(url: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """A kNN bank from a store's cached teacher CLS: (features [N, Dt] normalised, labels [N], manifest).

    Uses the centre view (index K) when the store has one, else view 0; skipped rows are dropped.
    """
    reader = StoreReader(url)
    manifest = reader.manifest
    view = int(manifest.get("k", 0)) if manifest.get("center_view") else 0
    rows = reader.valid_rows()
    data = reader.read_rows(rows, views=np.full((len(rows), 1), view), tokens=False)
    labels = np.asarray(data["labels"], dtype=np.int64)
    log.info("bank from store %s: %d rows, view %d, dim %d", reader.display, len(rows), view, reader.dim)
    return l2_normalize(np.asarray(data["cls"][:, 0], dtype=np.float32)), labels, manifest


# ---------------------------------------------------------------------------------------------- the run's sets


@dataclass
class BankSource:
    """The bank before embedding: a source to embed, or a store's cached teacher features.

    labels: [N] the source's own labels (-1 unlabelled); names: its class names (None if unknown).
    """

    spec: str
    labels: np.ndarray
    names: list[str] | None
    src: Any = None  # the source of --train
    features: np.ndarray | None = None  # [N, D] normalised, from --bank-store
    entry: dict = field(default_factory=dict)


def open_bank(cfg: EvalConfig, model: Any) -> BankSource:
    """The bank of ``cfg``: ``--train`` opened (not yet embedded), or ``--bank-store`` read."""
    if cfg.bank_store:
        feats, labels, manifest = bank_from_store(cfg.bank_store)
        _check_store_bank(manifest, model, feats)
        source = manifest.get("source") or {}
        entry = {"store": redact_text(cfg.bank_store), "source": source, "teacher": manifest.get("teacher")}
        return BankSource(cfg.bank_store, labels, class_names(manifest), features=feats, entry=entry)
    src = open_source(cfg.train, limit=cfg.limit_train)
    labels = np.asarray(src.labels(), dtype=np.int64)
    return BankSource(str(cfg.train), labels, src.class_names(), src=src)


def embed_bank(
    bank: BankSource, model: Any, emb_kw: dict, classes: ClassMap, data: dict
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The kNN bank (features, labels, mean patch tokens or None): ``bank`` embedded (or its store
    features, CLS only); unlabelled rows and the held-out OOD classes ``classes.held`` are left out."""
    patch = None
    if bank.src is not None:
        emb = embed_source(model, bank.src, **emb_kw)
        feats, labels = emb.features[emb.valid], bank.labels[emb.valid]
        patch = None if emb.mean_patch is None else emb.mean_patch[emb.valid]
        data["train"] = _data_entry(bank.src, emb)
    else:
        feats, labels = bank.features, bank.labels
        data["train"] = bank.entry
    keep = (labels >= 0) & ~np.isin(labels, classes.held)
    if (labels < 0).any():
        log.warning("bank: %d unlabelled rows left out", int((labels < 0).sum()))
    if not keep.any():
        raise ConfigError(
            "the bank has no labelled rows of in-distribution classes; check --train / --ood-classes"
        )
    return feats[keep], labels[keep], None if patch is None else patch[keep]


@dataclass
class Queries:
    """The embedded test images: src, emb, labels [N] in the bank's numbering (-1: none);
    heldout / id_mask: bool [N]."""

    src: Any
    emb: Embeddings
    labels: np.ndarray
    heldout: np.ndarray  # valid rows of the held-out OOD classes
    id_mask: np.ndarray  # valid, labelled rows of the bank's classes: the kNN queries


def embed_queries(
    cfg: EvalConfig, src: Any, model: Any, emb_kw: dict, classes: ClassMap, data: dict
) -> Queries:
    """Embed the test source ``src``; its labels are mapped into the bank's numbering by class
    name, and its rows of held-out classes become an OOD set."""
    own = np.asarray(src.labels(), dtype=np.int64)
    if not (own >= 0).any():  # before embedding: nothing to score
        raise ConfigError(
            f"the test set {redact_text(cfg.test)} is unlabelled ({len(own)} images, no class): knn-eval "
            "needs a labelled --test (class folders, or .cls / .json labels in a WebDataset)"
        )
    emb = embed_source(model, src, **emb_kw)
    data["test"] = _data_entry(src, emb)
    labels, held = classes.map_test(own)
    heldout = emb.valid & held
    id_mask = emb.valid & (labels >= 0) & ~heldout
    if not id_mask.any():
        raise ConfigError(f"{redact_text(cfg.test)} has no labelled in-distribution images to evaluate")
    return Queries(src, emb, labels, heldout, id_mask)


def embed_ood_sets(
    cfg: EvalConfig, model: Any, emb_kw: dict, queries: Queries, data: dict
) -> tuple[dict[str, np.ndarray], dict[str, str | None]]:
    """({set name: features [N, D]}, {set name: group}): the held-out classes of the test set (a
    near set when some ``--ood`` has a group), then each ``--ood [GROUP:][NAME=]SRC``."""
    sets: dict[str, np.ndarray] = {}
    specs = parse_ood_specs(cfg.ood)
    groups: dict[str, str | None] = {}
    if queries.heldout.any():
        sets[HELDOUT_SET] = queries.emb.features[queries.heldout]
        groups[HELDOUT_SET] = "near" if any(s.group for s in specs) else None
    for i, spec in enumerate(specs):
        src = open_source(spec.src, limit=cfg.limit_test)
        emb = embed_source(model, src, **emb_kw)
        data[f"ood{i}"] = {"name": spec.name, "group": spec.group, **_data_entry(src, emb)}
        sets[spec.name], groups[spec.name] = emb.features[emb.valid], spec.group
    return sets, groups


def _data_entry(src: Any, emb: Embeddings) -> dict:
    desc = src.describe()
    return {
        **{k: desc.get(k) for k in ("spec", "kind", "count", "keys_sha256")},
        "skipped": len(emb.errors),
        "cache_hit": emb.cache_hit,
        "embed_seconds": round(emb.seconds, 3),
    }


def _check_store_bank(manifest: dict, model: Any, bank: np.ndarray) -> None:
    if bank.shape[1] != model.dim:
        raise ConfigError(
            f"the store's teacher features have dim {bank.shape[1]} but the model gives {model.dim}; "
            "a store bank only fits the teacher that made it (pass --model teacher:NAME of that store)"
        )
    fp = (manifest.get("teacher") or {}).get("fingerprint")
    if fp and fp != model.fingerprint():
        log.warning(
            "the store was made by another model (fingerprint %s...); kNN compares across spaces", fp[:12]
        )
