"""Fashion-MNIST from the idx files of Debian's ``dataset-fashion-mnist`` (``fashion-mnist:train|test``)."""

from __future__ import annotations

import gzip
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from cospress.data.base import DEFAULT_MAX_PIXELS, Sample, Source
from cospress.errors import SourceError

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FMNIST_CACHE: dict[str, np.ndarray] = {}
_FMNIST_LOCK = threading.Lock()


def _read_idx(path: Path, magic: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    head = np.frombuffer(data[:4], ">u4")[0] if len(data) >= 4 else 0
    if head != magic:
        raise SourceError(f"{path} is not an idx file (magic {head}); reinstall dataset-fashion-mnist")
    ndim = magic & 0xFF
    dims = [int(d) for d in np.frombuffer(data[4 : 4 + 4 * ndim], ">u4")]
    arr = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise SourceError(f"{path} is truncated; reinstall dataset-fashion-mnist")
    return arr.reshape(dims)


class FashionMnistSource(Source):
    """``fashion-mnist:train|test``: 28x28 grey images as RGB; the pixels load lazily, once per process."""

    kind = "fashion-mnist"

    def __init__(self, spec: str, split: str, root: str) -> None:
        if split not in ("train", "test"):
            raise SourceError(
                f"{spec}: unknown split {split!r}; use fashion-mnist:train or fashion-mnist:test"
            )
        prefix = "train" if split == "train" else "t10k"
        base = Path(root).expanduser()
        self.images_path = str(self._find(spec, base, f"{prefix}-images-idx3-ubyte"))
        labels = _read_idx(self._find(spec, base, f"{prefix}-labels-idx1-ubyte"), 2049)
        keys = [f"{split}-{i:05d}" for i in range(len(labels))]
        self._rows = np.arange(len(labels))
        super().__init__(spec, str(base), keys, labels.tolist())

    @staticmethod
    def _find(spec: str, base: Path, stem: str) -> Path:
        for p in (base / f"{stem}.gz", base / stem):
            if p.is_file():
                return p
        raise SourceError(
            f"{spec}: {base / stem}.gz not found; run `apt-get install dataset-fashion-mnist` "
            "or pass a root (fashion-mnist:train@/path or root=...)"
        )

    def class_names(self) -> list[str]:
        return list(FASHION_MNIST_CLASSES)

    def _select(self, rows: list[int]) -> None:
        super()._select(rows)
        self._rows = self._rows[rows]

    def _images(self) -> np.ndarray:
        with _FMNIST_LOCK:
            arr = _FMNIST_CACHE.get(self.images_path)
            if arr is None:
                arr = _FMNIST_CACHE[self.images_path] = _read_idx(Path(self.images_path), 2051)
        return arr

    def read_bytes(self, i: int) -> None:
        return None

    def load(self, i: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Sample:
        i = self._check_index(i)
        pixels = self._images()[int(self._rows[i])]
        return Sample(self._keys[i], Image.fromarray(pixels, "L").convert("RGB"), self._labels[i])
