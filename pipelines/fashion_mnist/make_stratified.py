#!/usr/bin/env python
"""Write a stratified Fashion-MNIST subset as a class-folder image tree (``folder:`` source).

    python pipelines/fashion_mnist/make_stratified.py --out data/fashion-mnist-10k \
        --train-per-class 1000 --test-per-class 200

Takes the first N images of each class, in file order, from the idx files that Debian's
``dataset-fashion-mnist`` installs, and writes ``OUT/{train,test}/<label>_<name>/<index>.png``.
Folder names sort in label order, so ``folder:OUT/train`` gets labels 0..9 as in the idx files.
(``--limit N`` of cospress picks a hash-based subset instead: close to, not exactly, stratified.)
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzipped or not) as a numpy array ([N, 28, 28] images or [N] labels)."""
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_split(root: Path, split: str, per_class: int, out: Path) -> int:
    images_file, labels_file = FILES[split]
    images, labels = read_idx(root / images_file), read_idx(root / labels_file)
    written = 0
    for label, name in enumerate(CLASSES):
        folder = out / split / f"{label}_{name}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in np.flatnonzero(labels == label)[:per_class]:
            path = folder / f"{split}{index:05d}.png"
            if not path.exists():
                Image.fromarray(images[index]).save(path)
            written += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="/usr/share/datasets/fashion-mnist", help="idx files folder")
    parser.add_argument("--out", default="data/fashion-mnist-10k")
    parser.add_argument("--train-per-class", type=int, default=1000)
    parser.add_argument("--test-per-class", type=int, default=200)
    args = parser.parse_args()
    root, out = Path(args.root), Path(args.out)
    n_train = write_split(root, "train", args.train_per_class, out)
    n_test = write_split(root, "test", args.test_per_class, out)
    print(f"{out}: {n_train} train and {n_test} test images in 10 class folders each")


if __name__ == "__main__":
    main()
