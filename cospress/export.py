"""Export a trained student as a bare timm state dict plus a small JSON description.

``OUT/student.safetensors`` holds exactly ``timm.create_model(name, num_classes=0, img_size=size,
**timm_kwargs).state_dict()``, so it loads without cospress::

    m = timm.create_model(name, num_classes=0, img_size=size, **kwargs)
    m.load_state_dict(safetensors.torch.load_file("student.safetensors"))

``OUT/student.json``: timm_name, timm_kwargs, input_size, mean, std, dim, grid, method, teacher (the
store manifest's teacher description), cospress_version, and where it came from.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import cospress
from cospress import checkpoint as ckpt
from cospress.errors import CospressError
from cospress.utils import atomic_write_json, sha256_file

log = logging.getLogger(__name__)

STUDENT_WEIGHTS = "student.safetensors"
STUDENT_JSON = "student.json"


def export_student(
    run_dir: str | os.PathLike, out_dir: str | os.PathLike, which: str = "best"
) -> dict[str, Any]:
    """Write ``student.safetensors`` + ``student.json`` from checkpoint ``which`` (best | last) of a run.

    Returns the JSON description plus ``weights`` (path) and ``weights_sha256``.
    """
    run = Path(run_dir)
    if which not in ("best", "last"):
        raise CospressError(f"which={which!r}: export 'best' or 'last'")
    header_path = run / "run.json"
    if not header_path.is_file():
        raise CospressError(
            f"{run} is not a distill run folder (no run.json); pass the --out of cospress distill"
        )
    header = json.loads(header_path.read_text())
    wpath, _ = ckpt.paths(run, which)
    if not wpath.is_file():
        raise ckpt.CheckpointError(
            f"{wpath} does not exist; the run has not finished an epoch yet (export 'last' after a save)"
        )
    weights, meta = ckpt.load_weights(wpath)
    student = {k[len("student.") :]: v for k, v in weights.items() if k.startswith("student.")}
    if not student:
        raise ckpt.CheckpointError(
            f"{wpath} holds no student.* weights; it is not a cospress distill checkpoint"
        )
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
        "run": str(run.resolve()),
    }
    atomic_write_json(out / STUDENT_JSON, desc)
    log.info("exported %s (%s, step %s) to %s", info.get("timm_name"), which, desc["step"], out)
    return {
        **desc,
        "weights": str(out / STUDENT_WEIGHTS),
        "weights_sha256": sha256_file(out / STUDENT_WEIGHTS),
    }


def load_exported(path: str | os.PathLike) -> Any:
    """The exported student as a `FeatureModel` (eval mode) from a folder written by `export_student`."""
    import safetensors.torch

    from cospress.models.students import build_student

    d = Path(path)
    if not (d / STUDENT_JSON).is_file() or not (d / STUDENT_WEIGHTS).is_file():
        raise CospressError(
            f"{d} holds no exported student ({STUDENT_JSON} + {STUDENT_WEIGHTS}); run cospress export"
        )
    desc = json.loads((d / STUDENT_JSON).read_text())
    model = build_student(
        desc["timm_name"],
        int(desc["input_size"]),
        pretrained=False,
        mean=tuple(desc["mean"]),
        std=tuple(desc["std"]),
        **dict(desc.get("timm_kwargs") or {}),
    )
    model.model.load_state_dict(safetensors.torch.load_file(str(d / STUDENT_WEIGHTS)))
    return model.eval()
