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

import logging
import os
from pathlib import Path

from cospress.data.base import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    Sample,
    Source,
    apply_limit,
    decode_image,
)
from cospress.data.fashion_mnist import FASHION_MNIST_ROOT, FashionMnistSource
from cospress.data.wds_source import WdsSource
from cospress.errors import BadImageError, SourceError
from cospress.utils import redact_text

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_MAX_PIXELS", "FolderSource", "Sample", "Source", "decode_image", "open_source"]

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


# ---------------------------------------------------------------------------------------------- open


def open_source(spec: str, limit: int | None = None, root: str | None = None) -> Source:
    """Open a source from its spec; `root` is the data root of fashion-mnist, and the base folder
    of a relative folder/wds path. `limit` keeps that many keys (smallest sha256), in source order."""
    scheme, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise SourceError(
            f"cannot read source {redact_text(spec)!r}: use folder:PATH, wds:PATTERN or fashion-mnist:train|test"
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
            f"unknown source scheme {scheme!r} in {redact_text(spec)!r}: use folder:PATH, wds:PATTERN or fashion-mnist:train|test"
        )
    return apply_limit(src, limit)
