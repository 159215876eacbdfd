"""Checkpoints: weights as safetensors, training state as a plain-types ``torch.save`` file.

A checkpoint ``NAME`` (``last``, ``best``) in a run folder is one *generation* of two files and a
pointer that commits it:

- ``NAME-<step>-<tag>.safetensors``: the weights, unwrapped names (no ``module.`` / ``_orig_mod.``),
  e.g. ``student.*`` and ``compressor.*`` or ``head.*``; metadata holds the format version, step, tag.
- ``NAME-<step>-<tag>.state.pt``: tensors and plain types only (``torch.load(weights_only=True)``):
  optimizer, scheduler, step, epoch, position in epoch, RNG states, format version, resolved config
  as a plain dict, and the same tag.
- ``NAME.json``: the pointer, ``{"format_version", "weights", "state", "step", "tag"}``.

A save writes the new generation's two files (each to a temp file, fsynced, renamed), then switches
the pointer atomically (the commit), then deletes the older generations of ``NAME``. A kill at any
instant therefore leaves the pointer on the last complete generation, and the next ``--resume``
continues from it; files of an uncommitted generation are never read and are deleted by the next save.

A run folder written before generations (``NAME.safetensors`` + ``NAME.state.pt``, no pointer) is
still read; its first new save replaces those files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import uuid
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from cospress.errors import CospressError
from cospress.utils import atomic_write, atomic_write_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(CospressError):
    """A checkpoint is missing, torn, or of an unknown format version."""


def clean_name(name: str) -> str:
    """Remove every ``module.`` / ``_orig_mod.`` component from a parameter name."""
    parts = [p for p in name.split(".") if p not in ("module", "_orig_mod")]
    return ".".join(parts)


def clean_state_dict(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Unwrapped names, with ``prefix`` prepended; tensors detached, contiguous, on the CPU, unshared."""
    return {prefix + clean_name(k): v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def pointer_path(out_dir: str | os.PathLike, name: str) -> Path:
    """The pointer file that commits checkpoint ``name``'s current generation."""
    return Path(out_dir) / f"{name}.json"


def _read_pointer(out_dir: str | os.PathLike, name: str) -> dict[str, Any] | None:
    path = pointer_path(out_dir, name)
    try:
        pointer = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"checkpoint pointer {path} is unreadable ({e}); it was changed by hand"
        ) from None
    if not isinstance(pointer, dict) or not {"weights", "state"} <= set(pointer):
        raise CheckpointError(f"checkpoint pointer {path} names no weights and state; it was changed by hand")
    return pointer


def paths(out_dir: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """(weights path, state path) of checkpoint ``name``'s committed generation in ``out_dir``.

    A folder without a pointer gives the files of the layout before generations
    (``NAME.safetensors``, ``NAME.state.pt``), which may not exist.
    """
    out = Path(out_dir)
    pointer = _read_pointer(out, name)
    if pointer is None:
        return out / f"{name}.safetensors", out / f"{name}.state.pt"
    return out / Path(pointer["weights"]).name, out / Path(pointer["state"]).name


def exists(out_dir: str | os.PathLike, name: str) -> bool:
    """Whether checkpoint ``name`` has a committed generation (or an old-layout pair) in ``out_dir``."""
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


# A test hook: "POINT:N" kills this process with SIGKILL at POINT ("weights": after the weights file,
# "state": after the state file, before the commit; "pointer": after the commit, before the clean-up)
# of its N-th save_checkpoint call. Used by the kill-and-resume tests only.
KILL_HOOK_ENV = "COSPRESS_TEST_KILL_IN_SAVE"
_saves = 0


def _kill_hook(point: str) -> None:
    want, _, nth = os.environ.get(KILL_HOOK_ENV, "").partition(":")
    if want == point and int(nth or 1) == _saves:
        os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(
    out_dir: str | os.PathLike, name: str, weights: dict[str, torch.Tensor], state: dict[str, Any]
) -> None:
    """Write a new generation of checkpoint ``name``, commit it (the pointer), drop the older ones.

    ``weights`` must already have unwrapped names (see :func:`clean_state_dict`). ``state`` must hold
    tensors and plain types only; ``format_version`` and ``tag`` are added.
    """
    global _saves
    _saves += 1
    out = Path(out_dir)
    tag = uuid.uuid4().hex
    step = int(state.get("step", 0))
    gen = f"{name}-{step:08d}-{tag[:12]}"
    wpath, spath = out / f"{gen}.safetensors", out / f"{gen}.state.pt"
    meta = {"format_version": str(FORMAT_VERSION), "step": str(step), "tag": tag}
    save_weights(wpath, weights, meta)
    _kill_hook("weights")
    save_state(spath, {**state, "format_version": FORMAT_VERSION, "tag": tag})
    _kill_hook("state")
    pointer = {"format_version": FORMAT_VERSION, "weights": wpath.name, "state": spath.name}
    atomic_write_json(pointer_path(out, name), {**pointer, "step": step, "tag": tag})
    _fsync_dir(out)
    _kill_hook("pointer")
    _drop_other_generations(out, name, keep=gen)
    log.debug("saved checkpoint %s at step %d", out / gen, step)


def _fsync_dir(path: Path) -> None:
    """Make the renames in ``path`` durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _drop_other_generations(out: Path, name: str, keep: str) -> None:
    """Delete the files of ``name``'s generations other than ``keep``, its old-layout pair, and the
    temp files a killed save left behind."""
    gen = rf"{re.escape(name)}-\d+-[0-9a-f]+\.(safetensors|state\.pt)"
    pattern = re.compile(rf"{gen}|\.({gen}|{re.escape(name)}\.json)\..+\.tmp")
    old = {f"{name}.safetensors", f"{name}.state.pt"}
    for p in out.iterdir():
        if (p.name in old or pattern.fullmatch(p.name)) and not p.name.startswith(f"{keep}."):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


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
            f"checkpoint {wpath.with_suffix('')} is torn (weights and state from different saves: a run "
            "written before checkpoint generations, killed while saving); delete it and restart, or export 'best'"
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
