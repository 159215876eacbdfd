"""The exported student: its one writer (:func:`export_student`) and its one reader (:func:`read_export`).

``OUT/student.safetensors`` holds exactly ``timm.create_model(name, num_classes=0, img_size=size,
**timm_kwargs).state_dict()``, so it loads without cospress::

    m = timm.create_model(name, num_classes=0, img_size=size, **kwargs)
    m.load_state_dict(safetensors.torch.load_file("student.safetensors"))

``OUT/student.json``: timm_name, timm_kwargs, input_size, mean, std, dim, grid, method, teacher (the
store manifest's teacher description), cospress_version, and where it came from.

:func:`read_export` also reads a distill run folder that holds such an ``export/``, or the run's
own best / last checkpoint (``run.json`` + ``student.*`` weights), so every reader sees one shape.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import cospress
from cospress import checkpoint as ckpt
from cospress.command_config import ExportConfig
from cospress.errors import ConfigError, CospressError
from cospress.utils import atomic_write_json, sha256_file

log = logging.getLogger(__name__)

STUDENT_WEIGHTS = "student.safetensors"
STUDENT_JSON = "student.json"
RUN_JSON = "run.json"  # the header a distill run writes into its folder
_PREFIX = "student."


def _run_student(run: Path, which: str) -> tuple[dict, dict[str, Any], dict[str, str]]:
    """(run.json header, bare student state dict, safetensors metadata) of checkpoint ``which``."""
    wpath, _ = ckpt.paths(run, which)
    if not wpath.is_file():
        raise ckpt.CheckpointError(
            f"{wpath} does not exist; the run has not finished an epoch yet (export 'last' after a save)"
        )
    weights, meta = ckpt.load_weights(wpath)
    student = {k[len(_PREFIX) :]: v for k, v in weights.items() if k.startswith(_PREFIX)}
    if not student:
        raise ckpt.CheckpointError(
            f"{wpath} holds no student.* weights; it is not a cospress distill checkpoint"
        )
    return json.loads((run / RUN_JSON).read_text()), student, meta


def export_student(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    which: str = ExportConfig.which,
    format: str = ExportConfig.format,
) -> dict[str, Any]:
    """Write ``student.safetensors`` + ``student.json`` from checkpoint ``which`` (best | last) of a run,
    and with ``format="onnx"`` also ``student.onnx`` (checked against PyTorch: `onnx_export`).

    Returns the JSON description plus ``weights`` (path) and ``weights_sha256``.
    """
    run = Path(run_dir)
    if which not in ("best", "last"):
        raise CospressError(f"which={which!r}: export 'best' or 'last'")
    if format not in ("safetensors", "onnx"):
        raise CospressError(f"format={format!r}: export 'safetensors' or 'onnx'")
    if not (run / RUN_JSON).is_file():
        raise CospressError(
            f"{run} is not a distill run folder (no {RUN_JSON}); pass the --out of cospress distill"
        )
    header, student, meta = _run_student(run, which)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt.save_weights(
        out / STUDENT_WEIGHTS, student, {"format": "timm-state-dict", "step": meta.get("step", "")}
    )
    info = dict(header.get("student") or {})
    desc = {
        **info,
        "teacher": header.get("teacher"),
        "cospress_version": cospress.__version__,
        "checkpoint": which,
        "step": int(meta.get("step", 0) or 0),
        "run": run.resolve().name,  # the run folder's name: no local path in a file that is shared
    }
    if format == "onnx":
        from cospress.onnx_export import write_onnx

        desc["onnx"] = write_onnx(build_exported(desc, student, out), out)
    atomic_write_json(out / STUDENT_JSON, desc)
    log.info("exported %s (%s, step %s) to %s", info.get("timm_name"), which, desc["step"], out)
    return {
        **desc,
        "weights": str(out / STUDENT_WEIGHTS),
        "weights_sha256": sha256_file(out / STUDENT_WEIGHTS),
    }


def read_export(path: str | os.PathLike) -> tuple[dict, dict[str, Any]]:
    """(description, bare timm state dict) of a student.

    ``path`` is an export folder (student.json + student.safetensors), a distill run folder holding
    one in ``export/``, or a distill run folder itself (run.json + the ``best`` checkpoint, else
    ``last``, found through :func:`cospress.checkpoint.paths`; the description is run.json's ``student`` plus its ``teacher``).
    """
    import safetensors.torch

    folder = Path(path)
    for candidate in (folder, folder / "export"):
        if (candidate / STUDENT_JSON).is_file():
            if not (candidate / STUDENT_WEIGHTS).is_file():
                raise ConfigError(f"{candidate} has {STUDENT_JSON} but no {STUDENT_WEIGHTS}; re-export it")
            meta = json.loads((candidate / STUDENT_JSON).read_text())
            return meta, safetensors.torch.load_file(str(candidate / STUDENT_WEIGHTS))
    if not (folder / RUN_JSON).is_file():
        raise ConfigError(
            f"{folder} holds no {STUDENT_JSON}, export/{STUDENT_JSON} or {RUN_JSON}; pass a distill run "
            "folder, an exported student folder, or teacher:NAME"
        )
    which = next((w for w in ("best", "last") if ckpt.paths(folder, w)[0].is_file()), None)
    if which is None:
        raise ConfigError(f"{folder} is a distill run without a saved checkpoint yet; train an epoch first")
    header, state, _ = _run_student(folder, which)
    if not header.get("student"):
        raise ConfigError(f"{folder}/{RUN_JSON} does not describe the student; it is not a distill run")
    log.info("student weights from %s", ckpt.paths(folder, which)[0])
    return {**header["student"], "teacher": header.get("teacher")}, state


def build_exported(meta: dict, state: dict[str, Any], where: str | os.PathLike) -> Any:
    """The student of a :func:`read_export` result as a `FeatureModel` (eval mode) on the CPU."""
    from cospress.models.students import build_student

    if "timm_name" not in meta or "input_size" not in meta:
        raise ConfigError(f"the student description in {where} lacks timm_name or input_size; re-export it")
    model = build_student(
        meta["timm_name"],
        int(meta["input_size"]),
        pretrained=False,
        mean=tuple(meta["mean"]) if meta.get("mean") else None,
        std=tuple(meta["std"]) if meta.get("std") else None,
        **(meta.get("timm_kwargs") or {}),
    )
    missing, unexpected = model.model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"the student weights in {where} do not match the architecture ({len(missing)} missing, "
            f"{len(unexpected)} unexpected keys, e.g. {(list(missing) + list(unexpected))[:3]}); "
            "check timm_name / timm_kwargs"
        )
    return model.eval()


def load_exported(path: str | os.PathLike) -> Any:
    """The student at ``path`` (anything :func:`read_export` reads) as a `FeatureModel` in eval mode."""
    return build_exported(*read_export(path), path)
