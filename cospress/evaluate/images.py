"""Images for evaluation: the eval transform (PIL and tensor) and the dataset that feeds embedding.

Eval transform: resize the shorter side to input_size / crop_pct (bicubic), centre crop to
input_size, uint8. With ``decode="device"`` workers only read bytes; JPEGs are decoded in batches
on the compute device (:mod:`cospress.data.device_decode`) and resized there by
:func:`eval_transform_tensor`, which follows PIL's two-pass bicubic (within 2 grey levels).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from cospress.data.device_decode import Encoded, EncodedBatch, pack, worker_read
from cospress.errors import BadImageError
from cospress.evaluate.robustness import corrupt


def _eval_geometry(w: int, h: int, size: int, crop_pct: float) -> tuple[int, int, int, int]:
    """(resized width, resized height, crop left, crop top) of :func:`eval_transform`."""
    short = max(size, round(size / crop_pct))
    scale = short / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    return nw, nh, (nw - size) // 2, (nh - size) // 2


def eval_transform(image: Image.Image, size: int, crop_pct: float = 0.875) -> torch.Tensor:
    """Resize the shorter side to round(size / crop_pct) (bicubic), centre crop size x size.

    Returns uint8 [3, size, size].
    """
    nw, nh, left, top = _eval_geometry(*image.size, size, crop_pct)
    image = image.convert("RGB").resize((nw, nh), Image.BICUBIC)
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


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
        try:
            sample = worker_read(self.source, self.indices[pos], self.decode)
        except BadImageError as e:  # the cpu path; device reads carry their error in the Encoded
            return pos, torch.zeros(3, self.size, self.size, dtype=torch.uint8), str(e) or "bad image"
        if isinstance(sample, Encoded):
            return pos, sample
        image = sample.image
        if self.corruption and self.severity:
            image = corrupt(image, self.corruption, self.severity, seed=self.seed, key=sample.key)
        return pos, eval_transform(image, self.size, self.crop_pct), ""


def collate_encoded(items: list[tuple[int, Any]]) -> tuple[torch.Tensor, EncodedBatch]:
    """(positions int64 [B], packed samples) of a batch of device-mode EvalImages items."""
    return torch.as_tensor([p for p, _ in items], dtype=torch.int64), pack([e for _, e in items])


def load_pixels(source: Any, rows: Sequence[int], size: int, crop_pct: float = 0.875) -> torch.Tensor:
    """Eval-transformed images as float [B, 3, S, S] in [0, 1] (bad inputs raise BadImageError)."""
    return (
        torch.stack([eval_transform(source.load(int(r)).image, size, crop_pct) for r in rows]).float() / 255
    )
