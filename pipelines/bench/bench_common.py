"""Helpers shared by the benchmark scripts (imported as a sibling module: run the scripts by path)."""

from __future__ import annotations

from pathlib import Path

import torch


def random_teacher_weights(work: Path, name: str, size: int) -> str:
    """A random-init state dict of the teacher, saved for --weights (its speed is the real model's)."""
    from safetensors.torch import save_file

    from cospress.models.teachers import build_teacher

    path = work / f"random-{name}-{size}.safetensors"
    work.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        torch.manual_seed(0)
        model = build_teacher(name, image_size=size, pretrained=False).model
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)
