"""Checkpoints: weights as safetensors, training state as a plain-types ``torch.save`` file.

A checkpoint ``NAME`` in a run folder is two files:

- ``NAME.safetensors``: the weights, unwrapped names (no ``module.`` / ``_orig_mod.``), e.g.
  ``student.*`` and ``compressor.*`` or ``head.*``; metadata holds the format version, step and a tag.
- ``NAME.state.pt``: tensors and plain types only (loadable with ``torch.load(weights_only=True)``):
  optimizer, scheduler, step, epoch, position in epoch, RNG states, format version, resolved config
  as a plain dict, and the same tag, so a torn pair (killed between the two renames) is detected.

Each file is written to a temp file in the same folder, fsynced, and moved into place.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from cospress.errors import CospressError
from cospress.utils import atomic_write

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(CospressError):
    """A checkpoint is missing, torn, or of an unknown format version."""


def unwrap_module(module: torch.nn.Module) -> torch.nn.Module:
    """Strip DistributedDataParallel (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod  # type: ignore[assignment]
        elif isinstance(module, torch.nn.parallel.DistributedDataParallel):
            module = module.module
        else:
            return module


def clean_name(name: str) -> str:
    """Remove every ``module.`` / ``_orig_mod.`` component from a parameter name."""
    parts = [p for p in name.split(".") if p not in ("module", "_orig_mod")]
    return ".".join(parts)


def clean_state_dict(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Unwrapped names, with ``prefix`` prepended; tensors detached, contiguous, on the CPU, unshared."""
    return {prefix + clean_name(k): v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def paths(out_dir: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """(weights path, state path) of checkpoint ``name`` in ``out_dir``."""
    out = Path(out_dir)
    return out / f"{name}.safetensors", out / f"{name}.state.pt"


def exists(out_dir: str | os.PathLike, name: str) -> bool:
    w, s = paths(out_dir, name)
    return w.is_file() and s.is_file()


def save_weights(
    path: str | os.PathLike, weights: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file atomically (temp file, fsync, ``os.replace``)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata=metadata))


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """``torch.save`` a plain-types dict atomically."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def save_checkpoint(
    out_dir: str | os.PathLike, name: str, weights: dict[str, torch.Tensor], state: dict[str, Any]
) -> None:
    """Write ``NAME.safetensors`` and ``NAME.state.pt``, each atomically, tied by a shared tag.

    ``weights`` must already have unwrapped names (see :func:`clean_state_dict`). ``state`` must hold
    tensors and plain types only; ``format_version`` and ``tag`` are added.
    """
    wpath, spath = paths(out_dir, name)
    tag = uuid.uuid4().hex
    step = int(state.get("step", 0))
    meta = {"format_version": str(FORMAT_VERSION), "step": str(step), "tag": tag}
    save_weights(wpath, weights, meta)
    save_state(spath, {**state, "format_version": FORMAT_VERSION, "tag": tag})
    log.debug("saved checkpoint %s at step %d", wpath.with_suffix(""), step)


def load_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors on the CPU, safetensors metadata) of a weights file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint weights {path} do not exist; train first or check the run folder")
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    return safetensors.torch.load_file(str(path)), meta


def load_checkpoint(out_dir: str | os.PathLike, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, state) of checkpoint ``name``; refuses an unknown format version or a torn pair."""
    wpath, spath = paths(out_dir, name)
    if not spath.is_file():
        raise CheckpointError(f"checkpoint state {spath} does not exist; start without --resume")
    weights, meta = load_weights(wpath)
    state = torch.load(spath, map_location="cpu", weights_only=True)
    version = int(state.get("format_version", -1))
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {spath} has format version {version}, this cospress reads {FORMAT_VERSION}; "
            "use the cospress version that wrote it"
        )
    if meta.get("tag") != state.get("tag"):
        raise CheckpointError(
            f"checkpoint {wpath.with_suffix('')} is torn (weights and state from different steps, "
            "the run was killed while saving); delete it and restart, or export 'best'"
        )
    return weights, state


def split_weights(weights: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{"student.a": x, "head.b": y}`` -> ``{"student": {"a": x}, "head": {"b": y}}``."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in weights.items():
        group, _, rest = k.partition(".")
        out.setdefault(group, {})[rest] = v
    return out


def rng_state() -> dict[str, Any]:
    """The torch CPU and CUDA RNG states as uint8 tensors (weights_only-safe)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):
            torch.cuda.set_rng_state_all(state["cuda"])
