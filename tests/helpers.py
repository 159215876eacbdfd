"""Builders shared by the tests: tiny synthetic image folders, tiny teacher weight files, CLI runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def make_image_folder(
    root: Path, classes: int = 3, per_class: int = 6, seed: int = 0, size_range: tuple[int, int] = (36, 64)
) -> Path:
    """Class folders of random-sized PNG/JPEG images whose colour depends on the class."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = (int(v) for v in rng.integers(*size_range, size=2))
            base = np.zeros((h, w, 3), np.float32)
            base[..., c % 3] = 160
            noise = rng.normal(0, 40, size=(h, w, 3))
            arr = np.clip(base + noise, 0, 255).astype(np.uint8)
            ext = "png" if i % 2 == 0 else "jpg"
            Image.fromarray(arr).save(d / f"img_{i:03d}.{ext}")
    return root


def make_tiny_teacher_weights(path: Path, name: str = "test_vit", seed: int = 0, **kwargs) -> Path:
    """A random-init timm model saved as safetensors: a real teacher file that needs no hub."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def torchrun_cli(port: int, *args: str) -> list[str]:
    """The command line of `torchrun --nproc-per-node 2 -m cospress ARGS` (gloo ranks on this machine)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(port),
        "-m",
        "cospress",
        *args,
    ]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_cli(
    *args: str, check: bool = True, timeout: float = 300, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """Run ``python -m cospress ARGS`` in a subprocess (the real CLI, as a user would)."""
    cmd = [sys.executable, "-m", "cospress", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=cli_env(), cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc
