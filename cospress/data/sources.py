"""Image sources with random access: a folder, WebDataset tar shards, or Fashion-MNIST.

Every source lists its samples at open (keys, labels; no image decode) and decodes one sample on
demand with :meth:`Source.load`. Sources hold only paths and small index tables, so they pickle
cheaply into DataLoader worker processes.

Specs:
  ``folder:PATH``                 class sub-folders (label = index of the sorted folder name) or a flat folder
  ``wds:PATTERN``                 uncompressed WebDataset tar shards, brace patterns, local or fsspec URLs
  ``fashion-mnist:train|test``    the idx files of Debian's ``dataset-fashion-mnist`` (``@ROOT`` to move them)
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import re
import tarfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cospress.errors import BadImageError, SourceError
from cospress.utils import keys_sha256

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default decompression-bomb limit
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
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
        self._keys = list(keys)
        self._labels = [int(x) for x in labels]
        self.limit: int | None = None
        seen: set[str] = set()
        for k in self._keys:
            if k in seen:
                raise SourceError(f"duplicate key {k!r} in {spec}: every sample needs a unique key")
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
            "spec": self.spec,
            "kind": self.kind,
            "root": self.root,
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
            raise IndexError(f"sample {i} out of range for {self.spec} ({len(self)} samples)")
        return i % len(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, {len(self)} samples)"


def _apply_limit(src: Source, limit: int | None) -> Source:
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


# ---------------------------------------------------------------------------------------------- folder


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS and "." in name


class FolderSource(Source):
    """``folder:PATH``: class sub-folders (recursive) or a flat folder of images (labels -1)."""

    kind = "folder"

    def __init__(self, spec: str, path: str) -> None:
        root = Path(path).expanduser()
        if not root.is_dir():
            raise SourceError(f"{spec}: {root} is not a directory; pass folder:PATH with an existing folder")
        entries = sorted(os.scandir(root), key=lambda e: e.name)
        dirs = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
        top = [e.name for e in entries if e.is_file() and _is_image(e.name)]
        keys: list[str] = []
        labels: list[int] = []
        if dirs:
            if top:
                raise SourceError(
                    f"{spec}: {len(top)} images (e.g. {top[0]!r}) sit beside class folders; "
                    "move them into a class folder or point at a flat folder"
                )
            for label, name in enumerate(dirs):
                found = []
                for cur, subdirs, files in os.walk(root / name):
                    subdirs[:] = [d for d in subdirs if not d.startswith(".")]
                    rel = Path(cur).relative_to(root).as_posix()
                    found.extend(f"{rel}/{f}" for f in files if _is_image(f))
                if not found:
                    log.warning("%s: class folder %r holds no images", spec, name)
                keys.extend(found)
                labels.extend([label] * len(found))
            self._classes: list[str] | None = dirs
        else:
            keys, labels, self._classes = top, [-1] * len(top), None
        if not keys:
            raise SourceError(
                f"{spec}: no images ({'/'.join(IMAGE_EXTENSIONS)}) found under {root}; check the path"
            )
        order = sorted(range(len(keys)), key=keys.__getitem__)
        super().__init__(spec, str(root), [keys[o] for o in order], [labels[o] for o in order])

    def class_names(self) -> list[str] | None:
        return list(self._classes) if self._classes is not None else None

    def read_bytes(self, i: int) -> bytes:
        path = os.path.join(self.root, self._keys[self._check_index(i)])
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise BadImageError(f"unreadable: {e.strerror or e}") from None


# ---------------------------------------------------------------------------------------------- wds


def _wds_split(name: str) -> tuple[str, str] | None:
    """(key, lower-case extension) of a tar member: the key runs to the first dot of the basename."""
    d, _, base = name.rpartition("/")
    if base.startswith(".") or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (f"{d}/{stem}" if d else stem), ext.lower()


def _label_from(ext: str, data: bytes) -> int:
    try:
        if ext == "cls":
            return int(data.decode().strip())
        obj = json.loads(data)
        for field in ("label", "cls"):
            if isinstance(obj, dict) and isinstance(obj.get(field), (int, float)):
                return int(obj[field])
    except (ValueError, UnicodeDecodeError):
        pass
    return -1


def _open_binary(url: str):
    if "://" in url and not url.startswith("file://"):
        import fsspec

        return fsspec.open(url, "rb").open()
    return open(url.removeprefix("file://"), "rb")


class WdsSource(Source):
    """``wds:PATTERN``: uncompressed tar shards indexed once at open (member -> offset, size)."""

    kind = "wds"

    def __init__(self, spec: str, pattern: str) -> None:
        from braceexpand import braceexpand

        self.shards = list(braceexpand(pattern))
        keys: list[str] = []
        labels: list[int] = []
        # per sample: (shard index, {extension: (offset, size)})
        self._members: list[tuple[int, dict[str, tuple[int, int]]]] = []
        for s, url in enumerate(self.shards):
            self._index_shard(spec, s, url, keys, labels)
        if not keys:
            raise SourceError(f"{spec}: the shards hold no samples; check the pattern")
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()
        self._lock = threading.Lock()
        super().__init__(spec, pattern, keys, labels)

    def _index_shard(self, spec: str, s: int, url: str, keys: list[str], labels: list[int]) -> None:
        try:
            f = _open_binary(url)
        except (OSError, ValueError) as e:
            raise SourceError(f"{spec}: cannot open shard {url}: {e}; check the pattern") from None
        where: dict[str, int] = {}
        with f:
            try:
                tf = tarfile.open(fileobj=f, mode="r:")
            except tarfile.TarError as e:
                raise SourceError(
                    f"{spec}: {url} is not an uncompressed tar ({e}); use .tar shards"
                ) from None
            for m in tf:
                name = m.name
                parts = PurePosixPath(name).parts
                if name.startswith("/") or ".." in parts:
                    raise SourceError(f"{spec}: unsafe member path {name!r} in {url}; rebuild the shard")
                if not m.isfile():
                    continue
                split = _wds_split(name)
                if split is None:
                    continue
                key, ext = split
                row = where.get(key)
                if row is None:
                    row = where[key] = len(keys)
                    keys.append(key)
                    labels.append(-1)
                    self._members.append((s, {}))
                members = self._members[row][1]
                if ext in members:
                    raise SourceError(f"{spec}: duplicate member {name!r} in {url}; keys must be unique")
                members[ext] = (m.offset_data, m.size)
                if ext in ("cls", "json") and m.size <= 1 << 16 and (ext == "cls" or labels[row] < 0):
                    f.seek(m.offset_data)
                    labels[row] = _label_from(ext, f.read(m.size))

    def _select(self, rows: list[int]) -> None:
        super()._select(rows)
        self._members = [self._members[r] for r in rows]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = {}
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        with self._lock:
            if self._pid != os.getpid():  # forked: never share file positions with the parent
                self._handles, self._pid = {}, os.getpid()
            f = self._handles.get(shard)
            if f is None:
                f = self._handles[shard] = _open_binary(self.shards[shard])
            f.seek(offset)
            return f.read(size)

    def read_bytes(self, i: int) -> bytes:
        shard, members = self._members[self._check_index(i)]
        for ext in WDS_IMAGE_EXTENSIONS:
            if ext in members:
                try:
                    return self._read(shard, *members[ext])
                except OSError as e:
                    raise BadImageError(f"unreadable: {e}") from None
        raise BadImageError(f"not an image: sample has no {'/'.join(WDS_IMAGE_EXTENSIONS)} member")

    def close(self) -> None:
        with self._lock:
            for f in self._handles.values():
                f.close()
            self._handles = {}


# ---------------------------------------------------------------------------------------------- fashion-mnist

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


# ---------------------------------------------------------------------------------------------- open


def open_source(spec: str, limit: int | None = None, root: str | None = None) -> Source:
    """Open a source from its spec; `root` is the data root of fashion-mnist, and the base folder
    of a relative folder/wds path. `limit` keeps that many keys (smallest sha256), in source order."""
    scheme, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise SourceError(
            f"cannot read source {spec!r}: use folder:PATH, wds:PATTERN or fashion-mnist:train|test"
        )

    def join(p: str) -> str:
        return os.path.join(root, p) if root and "://" not in p and not os.path.isabs(p) else p

    if scheme == "folder":
        src: Source = FolderSource(spec, join(rest))
    elif scheme == "wds":
        src = WdsSource(spec, join(rest))
    elif scheme == "fashion-mnist":
        split, _, at = rest.partition("@")
        src = FashionMnistSource(spec, split, at or root or FASHION_MNIST_ROOT)
    else:
        raise SourceError(
            f"unknown source scheme {scheme!r} in {spec!r}: use folder:PATH, wds:PATTERN or fashion-mnist:train|test"
        )
    return _apply_limit(src, limit)
