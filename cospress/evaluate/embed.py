"""Models and embeddings for evaluation: load a model from a spec, embed a source, cache the result.

Embedding = eval transform (resize the shorter side to input_size / crop_pct, centre crop to
input_size, uint8) -> model -> CLS -> L2 normalisation. Results are cached on disk under a key of
the model fingerprint, the source's keys hash, the rows, the transform and any corruption.

With ``decode="device"`` (or auto / gpu on CUDA) workers only read bytes; JPEGs are decoded in
batches on the compute device (:mod:`cospress.data.device_decode`) and resized there by
:func:`eval_transform_tensor`, which follows PIL's two-pass bicubic (within 2 grey levels).
Corrupted inputs (robustness) always take the CPU path: the corruptions work on PIL images.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset

from cospress.data.device_decode import EncodedBatch, decode_batch, pack, read_encoded, resolve_decode
from cospress.errors import BadImageError, ConfigError
from cospress.evaluate.config import DEFAULT_CACHE_DIR
from cospress.evaluate.knn import l2_normalize
from cospress.evaluate.robustness import corrupt
from cospress.models.students import build_student
from cospress.models.teachers import build_teacher
from cospress.runtime import autocast, autocast_dtype
from cospress.store.reader import StoreReader
from cospress.utils import atomic_write_bytes, atomic_write_json, sha256_json

log = logging.getLogger(__name__)

CACHE_VERSION = 1
STUDENT_JSON = "student.json"
STUDENT_WEIGHTS = ("student.safetensors", "best.safetensors", "model.safetensors")
RUN_JSON = "run.json"


@dataclass
class LoadedModel:
    """A model ready for evaluation and what we know about where it came from."""

    model: Any  # cospress FeatureModel
    spec: str
    kind: str  # "teacher" or "student"
    teacher_spec: str | None = None  # the teacher recorded with a student (for fidelity)
    meta: dict = field(default_factory=dict)


def _teacher_spec_from_meta(meta: dict) -> str | None:
    """The model spec of the teacher recorded with a student (a name, a spec, or a describe() dict).

    None when there is none or it cannot be rebuilt (a random-init teacher).
    """
    teacher = meta.get("teacher")
    if isinstance(teacher, str) and teacher:
        return teacher if teacher.startswith(("teacher:", "random:")) else f"teacher:{teacher}"
    if isinstance(teacher, dict) and teacher.get("name"):
        source = str(teacher.get("source") or "")
        if source == "random":
            log.warning("the student's teacher was randomly initialised: no fidelity teacher by default")
            return None
        size = teacher.get("input_size")
        spec = f"teacher:{teacher['name']}" + (f"@{int(size)}" if size else "")
        if source.startswith("file:"):
            spec += "=" + source[len("file:") :]
        return spec
    return None


def _student_folder(path: Path) -> Path:
    """The folder holding student.json (the path itself or RUN/export), or a run folder (run.json)."""
    for candidate in (path, path / "export"):
        if (candidate / STUDENT_JSON).is_file():
            return candidate
    if (path / RUN_JSON).is_file():
        return path
    raise ConfigError(
        f"{path} holds no {STUDENT_JSON}, export/{STUDENT_JSON} or {RUN_JSON}; pass a distill run "
        "folder, an exported student folder, or teacher:NAME"
    )


def _student_meta_and_weights(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(description, bare timm state dict) of an exported student or of a run's best/last checkpoint."""
    if (folder / STUDENT_JSON).is_file():
        meta = json.loads((folder / STUDENT_JSON).read_text())
        weights = next((folder / w for w in STUDENT_WEIGHTS if (folder / w).is_file()), None)
        if weights is None:
            raise ConfigError(f"{folder} has {STUDENT_JSON} but no {' / '.join(STUDENT_WEIGHTS)}")
        state = load_file(str(weights))
        if any(k.startswith("student.") for k in state):
            state = {k[len("student.") :]: v for k, v in state.items() if k.startswith("student.")}
        return meta, state
    header = json.loads((folder / RUN_JSON).read_text())
    weights = next(
        (folder / f"{w}.safetensors" for w in ("best", "last") if (folder / f"{w}.safetensors").is_file()),
        None,
    )
    if weights is None or not header.get("student"):
        raise ConfigError(f"{folder} is a distill run without a saved checkpoint yet; train an epoch first")
    state = {k[len("student.") :]: v for k, v in load_file(str(weights)).items() if k.startswith("student.")}
    log.info("student weights from %s", weights)
    return {**header["student"], "teacher": header.get("teacher")}, state


def parse_teacher_spec(spec: str) -> tuple[str, int | None, str | None, bool]:
    """`teacher:NAME[@SIZE][=WEIGHTS]` or `random:NAME[@SIZE]` -> (name, size, weights, random)."""
    prefix, _, rest = spec.partition(":")
    rest, _, weights = rest.partition("=")
    name, _, size = rest.partition("@")
    if prefix not in ("teacher", "random") or not name:
        raise ConfigError(f"model spec {spec!r} is not teacher:NAME[@SIZE][=WEIGHTS] or random:NAME[@SIZE]")
    try:
        image_size = int(size) if size else None
    except ValueError:
        raise ConfigError(f"model spec {spec!r}: the size after @ must be an integer") from None
    return name, image_size, weights or None, prefix == "random"


def load_model(spec: str, device: torch.device | str = "cpu") -> LoadedModel:
    """A model from a spec, in eval mode on `device` with gradients off.

    Specs: `teacher:NAME[@SIZE][=WEIGHTS]` (a teacher: hub / built-in weights, or a weights file),
    `random:NAME[@SIZE]` (random init: tests and a random-features baseline), or a folder: an
    exported student (student.json {"timm_name", "input_size", "mean", "std", "timm_kwargs",
    optionally "teacher"} + student.safetensors), a distill run folder with such an export/, or a
    distill run folder itself (run.json + best.safetensors, else last.safetensors, `student.*` keys).
    """
    if spec.startswith(("teacher:", "random:")):
        name, image_size, weights, random_init = parse_teacher_spec(spec)
        model = build_teacher(
            name, weights=weights, image_size=image_size, pretrained=False if random_init else None
        )
        loaded = LoadedModel(model, spec, "teacher")
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise ConfigError(
                f"model {spec!r} is neither teacher:NAME nor an existing folder; give a distill run "
                "folder, an export folder, or teacher:NAME"
            )
        meta, state = _student_meta_and_weights(_student_folder(path))
        if "timm_name" not in meta or "input_size" not in meta:
            raise ConfigError(
                f"the student description in {path} lacks timm_name or input_size; re-export it"
            )
        model = build_student(
            meta["timm_name"],
            int(meta["input_size"]),
            pretrained=False,
            mean=tuple(meta["mean"]) if meta.get("mean") else None,
            std=tuple(meta["std"]) if meta.get("std") else None,
            **(meta.get("timm_kwargs") or {}),
        )
        _load_weights(model, state, path)
        loaded = LoadedModel(model, spec, "student", _teacher_spec_from_meta(meta), meta)
    model.to(device).eval().requires_grad_(False)
    log.info("model %s: %s at %d px, dim %d", spec, model.name, model.input_size, model.dim)
    return loaded


def _load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    target = model if any(k.startswith("model.") for k in state) else model.model
    missing, unexpected = target.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"the student weights in {where} do not match the architecture ({len(missing)} missing, "
            f"{len(unexpected)} unexpected keys, e.g. {(list(missing) + list(unexpected))[:3]}); "
            "check timm_name / timm_kwargs"
        )


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


def eval_transform(image: Image.Image, size: int, crop_pct: float = 0.875) -> torch.Tensor:
    """Resize the shorter side to round(size / crop_pct) (bicubic), centre crop size x size.

    Returns uint8 [3, size, size].
    """
    w, h = image.size
    short = max(size, round(size / crop_pct))
    scale = short / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.convert("RGB").resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def _eval_geometry(w: int, h: int, size: int, crop_pct: float) -> tuple[int, int, int, int]:
    """(resized width, resized height, crop left, crop top) of :func:`eval_transform`."""
    short = max(size, round(size / crop_pct))
    scale = short / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    return nw, nh, (nw - size) // 2, (nh - size) // 2


def eval_transform_tensor(image: torch.Tensor, size: int, crop_pct: float = 0.875) -> torch.Tensor:
    """:func:`eval_transform` of a uint8 [3, H, W] tensor on any device: uint8 [3, size, size].

    Like PIL: antialiased bicubic, horizontal pass first, rounded to uint8 between the passes, a
    pass skipped when its size does not change; within 2 grey levels of the PIL result.
    """
    _, h, w = image.shape
    nw, nh, left, top = _eval_geometry(w, h, size, crop_pct)
    x = image[None].float()
    if nw != w:
        x = F.interpolate(x, size=(h, nw), mode="bicubic", align_corners=False, antialias=True)
        x = x.round_().clamp_(0, 255)
    if nh != h:
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    x = x[0, :, top : top + size, left : left + size]
    return x.round_().clamp_(0, 255).to(torch.uint8)


class EvalImages(Dataset):
    """Rows `indices` of a source as eval-transformed uint8 [3, S, S], optionally corrupted first.

    An item is (position, image, error): error is "" or why the input could not be decoded. With
    ``decode="device"`` an item is (position, Encoded) instead (collate with :func:`collate_encoded`).
    """

    def __init__(
        self,
        source: Any,
        indices: Sequence[int],
        size: int,
        crop_pct: float = 0.875,
        corruption: str | None = None,
        severity: int = 0,
        seed: int = 0,
        decode: str = "cpu",
    ) -> None:
        self.decode = decode
        self.source = source
        self.indices = list(indices)
        self.size = size
        self.crop_pct = crop_pct
        self.corruption = corruption
        self.severity = severity
        self.seed = seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, pos: int) -> tuple[Any, ...]:
        if self.decode == "device":
            return pos, read_encoded(self.source, self.indices[pos])
        try:
            sample = self.source.load(self.indices[pos])
        except BadImageError as e:
            return pos, torch.zeros(3, self.size, self.size, dtype=torch.uint8), str(e) or "bad image"
        image = sample.image
        if self.corruption and self.severity:
            image = corrupt(image, self.corruption, self.severity, seed=self.seed, key=sample.key)
        return pos, eval_transform(image, self.size, self.crop_pct), ""


def collate_encoded(items: list[tuple[int, Any]]) -> tuple[torch.Tensor, EncodedBatch]:
    """(positions int64 [B], packed samples) of a batch of device-mode EvalImages items."""
    return torch.as_tensor([p for p, _ in items], dtype=torch.int64), pack([e for _, e in items])


@dataclass
class Embeddings:
    """features: [N, D] float32, L2-normalised (zeros where invalid); valid: [N] bool; rows: [N] source rows."""

    features: np.ndarray
    valid: np.ndarray
    rows: np.ndarray
    errors: dict[int, str] = field(default_factory=dict)  # source row -> why it was skipped
    cache_hit: bool = False
    seconds: float = 0.0


def _cache_key(
    model: Any, source: Any, rows: np.ndarray, crop_pct: float, extra: dict, decode: str = "cpu"
) -> str:
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
            **extra,
        }
    )


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


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
    """L2-normalised CLS embeddings of `rows` of a source (all rows by default), cached on disk.

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
        cache = Path(cache_dir).expanduser() / _cache_key(model, source, rows, crop_pct, extra, decode)
        if (cache.with_suffix(".json")).is_file() and cache.with_suffix(".npy").is_file():
            meta = json.loads(cache.with_suffix(".json").read_text())
            feats = np.load(cache.with_suffix(".npy"))
            log.info("embedding cache hit: %s (%d rows of %s)", cache.name[:16], len(rows), source.spec)
            errors = {int(k): v for k, v in meta["errors"].items()}
            valid = np.array([int(r) not in errors for r in rows], dtype=bool)
            return Embeddings(feats, valid, rows, errors, cache_hit=True)
    start = time.perf_counter()
    feats, errors = _run(
        model, source, rows, batch_size, workers, device, precision, crop_pct, corruption, severity, seed,
        decode,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    valid = np.array([int(r) not in errors for r in rows], dtype=bool)
    log.info(
        "embedded %d rows of %s in %.1f s (%.0f images/s, %d skipped)",
        len(rows), source.spec, seconds, len(rows) / max(seconds, 1e-9), len(errors),
    )  # fmt: skip
    if cache is not None:
        atomic_write_bytes(cache.with_suffix(".npy"), _npy_bytes(feats))
        atomic_write_json(
            cache.with_suffix(".json"),
            {"spec": source.spec, "rows": len(rows), "errors": {str(k): v for k, v in errors.items()}},
        )
    return Embeddings(feats, valid, rows, errors, seconds=seconds)


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
    errors: dict[int, str] = {}
    with torch.inference_mode(), autocast(device, dtype):
        for pos, *batch in loader:
            if on_device:
                images, errs = _device_batch(batch[0], model.input_size, crop_pct, device)
            else:
                images, errs = batch[0].to(device, non_blocking=True), batch[1]
            out = model(images).cls.float()
            feats[pos.numpy()] = out.cpu().numpy()
            for p, e in zip(pos.tolist(), errs, strict=True):
                if e:
                    errors[int(rows[p])] = e
    feats = l2_normalize(feats)
    for r in errors:
        feats[np.flatnonzero(rows == r)] = 0.0
    return feats, errors


def load_pixels(source: Any, rows: Sequence[int], size: int, crop_pct: float = 0.875) -> torch.Tensor:
    """Eval-transformed images as float [B, 3, S, S] in [0, 1] (bad inputs raise BadImageError)."""
    return (
        torch.stack([eval_transform(source.load(int(r)).image, size, crop_pct) for r in rows]).float() / 255
    )


def pixel_features_fn(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """f(x) for pixels x in [0, 1] [B, 3, S, S]: normalise with the model's mean/std, return CLS [B, D]."""
    mean = torch.tensor(model.mean).view(1, -1, 1, 1)
    std = torch.tensor(model.std).view(1, -1, 1, 1)

    def f(x: torch.Tensor) -> torch.Tensor:
        return model((x - mean.to(x.device)) / std.to(x.device)).cls

    return f
