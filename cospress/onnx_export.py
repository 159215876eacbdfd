"""The student as ONNX (``cospress export --format onnx``): ``student.onnx`` beside the safetensors.

Input ``pixels`` float32 [B, 3, S, S], normalised with student.json's ``mean`` / ``std`` (S its
``input_size``); outputs ``cls`` [B, D] and ``tokens`` [B, T, D], as ``FeatureModel`` gives them. The
batch is dynamic. Written with torch's dynamo exporter (``onnxscript``) at opset ``OPSET``, then
checked with onnxruntime against the PyTorch student on a few seeded images at batch sizes 1 and
``CHECK_IMAGES``: the max abs difference is returned (and printed by the CLI), and a student whose
ONNX outputs differ by more than ``TOLERANCE`` x the output scale is refused.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from cospress.errors import ConfigError, CospressError

log = logging.getLogger(__name__)

ONNX_FILE = "student.onnx"
# torch's dynamo exporter writes opset 18 and up; onnxruntime runs opset 18 from 1.14 (2023) through
# the current 1.2x-1.3x releases, so 18 is the opset every supported onnxruntime loads.
OPSET = 18
CHECK_IMAGES = 4
TOLERANCE = 1e-3  # max |onnx - torch| / max(1, max |torch|); fp32 students measure ~1e-6
_PACKAGES = ("onnx", "onnxruntime", "onnxscript")


def _outputs_module(model: Any) -> Any:
    import torch

    class Outputs(torch.nn.Module):
        """Normalised pixels -> (cls, tokens): the FeatureModel's forward without its uint8 branch."""

        def __init__(self) -> None:
            super().__init__()
            self.student = model

        def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            features = self.student._extract(pixels)[0]
            return features.cls, features.tokens

    return Outputs().eval()


def _pixels(model: Any, n: int, seed: int = 0) -> Any:
    """``n`` seeded noise images, normalised as the student's mean / std say (what a deployer feeds)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    size = model.input_size
    images = torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 255.0
    mean, std = torch.tensor(model.mean).view(1, -1, 1, 1), torch.tensor(model.std).view(1, -1, 1, 1)
    return (images - mean) / std


def check_onnx(path: Path, model: Any) -> float:
    """Max abs difference of the ONNX outputs against the PyTorch student's (batches 1 and CHECK_IMAGES)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wrapper, worst, scale = _outputs_module(model), 0.0, 1.0
    pixels = _pixels(model, CHECK_IMAGES)
    for batch in (pixels[:1], pixels):
        with torch.no_grad():
            expected = [t.float().numpy() for t in wrapper(batch)]
        got = session.run(["cls", "tokens"], {"pixels": batch.numpy()})
        for e, g in zip(expected, got, strict=True):
            if e.shape != g.shape:
                raise CospressError(f"{path.name}: ONNX output shape {g.shape} != PyTorch {e.shape}")
            if e.size:
                worst = max(worst, float(np.abs(e - g).max()))
                scale = max(scale, float(np.abs(e).max()))
    if worst > TOLERANCE * scale:
        raise CospressError(
            f"{path.name} differs from the PyTorch student by {worst:.3g} (> {TOLERANCE} x {scale:.3g}); "
            "not exported"
        )
    return worst


def write_onnx(model: Any, out: Path) -> dict[str, Any]:
    """Write ``out/student.onnx`` from a FeatureModel (CPU, eval), check it; returns its description."""
    missing = [p for p in _PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise ConfigError(f"--format onnx needs {', '.join(missing)}: pip install 'cospress[onnx]'")
    import torch

    model = model.float().eval()
    wrapper, path = _outputs_module(model), out / ONNX_FILE
    tmp = out / f".{ONNX_FILE}.tmp"
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with torch.no_grad():
        torch.onnx.export(
            wrapper, (_pixels(model, 2),), str(tmp), input_names=["pixels"], output_names=["cls", "tokens"],
            opset_version=OPSET, dynamo=True, dynamic_shapes=({0: batch},), verbose=False,
        )  # fmt: skip
    try:
        diff = check_onnx(tmp, model)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    log.info("%s: opset %d, dynamic batch; max abs diff vs PyTorch %.3g", path, OPSET, diff)
    return {
        "file": ONNX_FILE,
        "opset": OPSET,
        "input": f"pixels float32 [B, 3, {model.input_size}, {model.input_size}], normalised with mean / std",
        "outputs": [f"cls float32 [B, {model.dim}]", f"tokens float32 [B, {model.num_tokens}, {model.dim}]"],
        "max_abs_diff": diff,
        "checked_images": CHECK_IMAGES,
    }
