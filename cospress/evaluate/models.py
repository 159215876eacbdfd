"""Models for evaluation: a teacher or a student from a spec, ready to embed with.

Specs: ``teacher:NAME[@SIZE][=WEIGHTS]`` (hub / built-in weights, or a weights file),
``random:NAME[@SIZE]`` (random init: tests and a random-features baseline), or a folder that
:func:`cospress.export.read_export` reads (an exported student, a distill run folder with an
``export/``, or a distill run folder itself).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cospress.errors import ConfigError
from cospress.export import build_exported, read_export
from cospress.models.teachers import build_teacher

log = logging.getLogger(__name__)


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
    """A model from a spec (see the module docstring), in eval mode on `device` with gradients off."""
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
        meta, state = read_export(path)
        model = build_exported(meta, state, path)
        loaded = LoadedModel(model, spec, "student", _teacher_spec_from_meta(meta), meta)
    model.to(device).eval().requires_grad_(False)
    log.info("model %s: %s at %d px, dim %d", spec, model.name, model.input_size, model.dim)
    return loaded


def pixel_features_fn(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """f(x) for pixels x in [0, 1] [B, 3, S, S]: normalise with the model's mean/std, return CLS [B, D]."""
    mean = torch.tensor(model.mean).view(1, -1, 1, 1)
    std = torch.tensor(model.std).view(1, -1, 1, 1)

    def f(x: torch.Tensor) -> torch.Tensor:
        return model((x - mean.to(x.device)) / std.to(x.device)).cls

    return f
