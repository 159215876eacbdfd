#!/usr/bin/env python
"""Make a Python that holds only what the GPU image holds, to test the device kit on this machine.

    python pipelines/gpu/image_python.py DIR     # prints DIR/bin/python

A venv (no system site-packages) whose site-packages links, from the running Python's own, the
distributions the GPU image has (torch, timm, typer, fsspec, safetensors, tensorstore, numpy) and
everything they require, nothing else: no zarr, numcodecs, webdataset, faiss, pytest, scipy, cospress.
Linking instead of installing takes a second (torch is ~1 GB); the Python version is this one's, so
the kit is tested with wheels fetched for it (`PYVER=3.11 fetch_wheels.sh`), the image's are 3.12.
"""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

IMAGE = ("torch", "torchvision", "timm", "typer", "fsspec", "safetensors", "tensorstore", "numpy", "pip")


def _name(req: str) -> str | None:
    """The distribution a requirement names, None when it applies only to an extra or another platform."""
    from packaging.requirements import Requirement

    r = Requirement(req)
    if r.marker is not None and not r.marker.evaluate({"extra": ""}):
        return None
    return r.name


def closure(roots: tuple[str, ...]) -> list[metadata.Distribution]:
    """The installed distributions of ``roots`` and of everything they require (not their extras)."""
    seen: dict[str, metadata.Distribution] = {}
    todo = list(roots)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional or platform dependency that is not installed here
        seen[name] = dist
        todo += [n for n in (_name(r) for r in dist.requires or []) if n]
    return list(seen.values())


def main() -> None:
    root = Path(sys.argv[1]).resolve()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    site = Path(subprocess.run(
        [str(root / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip())  # fmt: skip
    here = Path(sysconfig.get_paths()["purelib"])
    for dist in closure(IMAGE):
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            src = here / top
            if src.exists() and not (site / top).exists() and top != "__pycache__":
                (site / top).symlink_to(src)
    print(root / "bin" / "python")


if __name__ == "__main__":
    main()
