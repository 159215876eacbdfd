"""The source interface every image source implements, and the one image decode all paths share."""

from __future__ import annotations

import hashlib
import io
import logging
import re
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cospress.errors import BadImageError, SourceError
from cospress.utils import keys_sha256, redact_text

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default decompression-bomb limit
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")


@dataclass
class Sample:
    """One decoded sample: its stable key, an RGB image, and its class (-1 when unlabelled)."""

    key: str
    image: Image.Image
    label: int


# ---------------------------------------------------------------------------------------------- decode


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: alpha composited on white, 16-bit and float scaled to 8 bits."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im).astype(np.float64)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if mode.startswith("I;16"):
            a = a / 257.0
        elif mode == "F" and lo >= 0.0 and hi <= 1.0:
            a = a * 255.0
        elif lo >= 0.0 and hi <= 255.0:
            pass
        elif mode == "I" and lo >= 0.0 and hi <= 65535.0:
            a = a / 257.0
        else:  # arbitrary range: stretch min..max to 0..255
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        g = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(g, "L").convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, ...


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode encoded bytes to an RGB image with EXIF orientation applied.

    Raises BadImageError whose message starts with a machine-readable reason: ``empty file``,
    ``not an image``, ``truncated image``, ``too many pixels`` or ``unreadable``. The pixel count is
    checked from the header before decoding; PIL's global limits are never changed, so PIL's own
    decompression-bomb check (``Image.MAX_IMAGE_PIXELS``, whose warning counts as an error here) still
    caps a `max_pixels` set above it.
    """
    if not data:
        raise BadImageError("empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                raise BadImageError(f"too many pixels ({w} x {h} > {max_pixels})")
            im.load()
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im)
        except BadImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            n = re.findall(r"(\d+) pixels", str(e))  # PIL's own check fires in Image.open, before the size
            detail = f"{n[0]} > {n[1]}" if len(n) == 2 else str(e)
            raise BadImageError(f"too many pixels ({detail})") from None
        except UnidentifiedImageError:
            raise BadImageError("not an image") from None
        except (EOFError, SyntaxError) as e:
            raise BadImageError(f"truncated image: {e}") from None
        except OSError as e:
            msg = str(e)
            if "truncated" in msg.lower():
                raise BadImageError(f"truncated image: {msg}") from None
            raise BadImageError(f"unreadable: {msg}") from None
        except Exception as e:  # any other decoder failure is still one bad input
            raise BadImageError(f"unreadable: {type(e).__name__}: {e}") from None


# ---------------------------------------------------------------------------------------------- base


class Source:
    """Random-access image source in a deterministic order; see the module docstring for specs."""

    kind = "base"

    def __init__(self, spec: str, root: str, keys: list[str], labels: list[int]) -> None:
        self.spec = spec
        self.root = root
        self.shown = redact_text(spec)  # the spec as written and logged: no URL credentials or query
        self._keys = list(keys)
        self._labels = [int(x) for x in labels]
        self.limit: int | None = None
        seen: set[str] = set()
        for k in self._keys:
            if k in seen:
                raise SourceError(f"duplicate key {k!r} in {self.shown}: every sample needs a unique key")
            seen.add(k)

    def __len__(self) -> int:
        return len(self._keys)

    def keys(self) -> list[str]:
        return list(self._keys)

    def labels(self) -> list[int]:
        return list(self._labels)

    def class_names(self) -> list[str] | None:
        return None

    def read_bytes(self, i: int) -> bytes | None:
        """The raw encoded bytes of sample i, or None when the source has none (arrays)."""
        raise NotImplementedError

    def load(self, i: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Sample:
        """Decode sample i; raises BadImageError(reason) for an input that cannot be decoded."""
        data = self.read_bytes(i)
        if data is None:
            raise NotImplementedError
        return Sample(self._keys[i], decode_image(data, max_pixels), self._labels[i])

    def describe(self) -> dict[str, Any]:
        names = self.class_names()
        return {
            "spec": self.shown,
            "kind": self.kind,
            "root": redact_text(self.root),
            "count": len(self),
            "limit": self.limit,
            "keys_sha256": keys_sha256(self._keys),
            "class_names": list(names) if names is not None else None,
        }

    def _select(self, rows: list[int]) -> None:
        """Keep only `rows` (increasing positions); subclasses subset their own tables too."""
        self._keys = [self._keys[r] for r in rows]
        self._labels = [self._labels[r] for r in rows]

    def _check_index(self, i: int) -> int:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {self.shown} ({len(self)} samples)")
        return i % len(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.shown!r}, {len(self)} samples)"


def apply_limit(src: Source, limit: int | None) -> Source:
    """Keep the `limit` keys with the smallest sha256(key), in source order."""
    if limit is None:
        return src
    if limit <= 0:
        raise SourceError(f"limit must be a positive number of samples, got {limit}")
    if limit < len(src):
        digests = [hashlib.sha256(k.encode()).digest() for k in src._keys]
        rows = sorted(sorted(range(len(digests)), key=digests.__getitem__)[:limit])
        src._select(rows)
    src.limit = limit
    return src
