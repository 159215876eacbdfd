"""Image corruptions (ImageNet-C style, severities 1-5) and a feature-space PGD attack.

Corruptions act on PIL RGB images before the eval transform. Their parameters follow the
ImageNet-C definitions (Hendrycks & Dietterich, 2019), written for 224 px images; the blur width is
scaled by (shorter side / 224) so that a severity means the same thing at any resolution. Noise is
drawn from a generator keyed by (seed, sample key, corruption, severity): the same image gets the
same noise whatever the order, batch or worker.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

from cospress.errors import ConfigError

log = logging.getLogger(__name__)

SEVERITIES = (1, 2, 3, 4, 5)
_PARAMS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),  # noise std on [0, 1] pixels
    "gaussian_blur": (1.0, 2.0, 3.0, 4.0, 6.0),  # sigma in px at 224
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),  # factor towards the per-channel mean
    "jpeg": (25, 18, 15, 10, 7),  # JPEG quality
    "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),  # downscale factor
}
CORRUPTIONS: tuple[str, ...] = tuple(_PARAMS)


def _rng(seed: int, key: str, name: str, severity: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}|{key}|{name}|{severity}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _to_float(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0


def _to_image(x: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8), "RGB")


def corrupt(image: Image.Image, name: str, severity: int, seed: int = 0, key: str = "") -> Image.Image:
    """The image under corruption `name` at severity 1-5 (severity 0 = the image unchanged).

    Deterministic in (image, name, severity, seed, key).
    """
    if name not in _PARAMS:
        raise ConfigError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    if severity == 0:
        return image.convert("RGB")
    if severity not in SEVERITIES:
        raise ConfigError(f"corruption severity must be 0-5, got {severity}")
    c = _PARAMS[name][severity - 1]
    if name == "gaussian_noise":
        x = _to_float(image)
        return _to_image(x + _rng(seed, key, name, severity).normal(0.0, c, size=x.shape))
    if name == "gaussian_blur":
        x = _to_float(image)
        sigma = c * min(image.size) / 224.0
        return _to_image(gaussian_filter(x, sigma=(sigma, sigma, 0), mode="reflect"))
    if name == "contrast":
        x = _to_float(image)
        mean = x.mean(axis=(0, 1), keepdims=True)
        return _to_image((x - mean) * c + mean)
    if name == "jpeg":
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="JPEG", quality=int(c))
        buf.seek(0)
        with Image.open(buf) as im:
            return im.convert("RGB")
    # pixelate
    w, h = image.size
    small = image.convert("RGB").resize((max(1, round(w * c)), max(1, round(h * c))), Image.BOX)
    return small.resize((w, h), Image.NEAREST)


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - cos(a, b) per row of [B, D] -> [B]."""
    return 1.0 - torch.nn.functional.cosine_similarity(a, b, dim=-1)


def feature_pgd(
    features_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """PGD-L∞ in pixel space that maximises 1 - cos(f(x + δ), f(x)); returns x + δ.

    features_fn: float [B, 3, H, W] pixels in [0, 1] -> [B, D] features (normalisation inside).
    x: [B, 3, H, W] float in [0, 1]. δ starts uniform in the ε box (at δ = 0 the gradient is zero,
    the objective being at its minimum), takes `steps` signed-gradient steps of size step_size
    (default 2.5 ε / steps), and stays in the ε box and in [0, 1]. Gradients are computed in fp32.
    """
    step_size = 2.5 * eps / steps if step_size is None else step_size
    x = x.detach().float()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    delta = (torch.rand(x.shape, generator=gen) * 2 - 1).to(x.device) * eps
    delta = ((x + delta).clamp(0, 1) - x).detach()
    with torch.autocast(device_type=x.device.type, enabled=False):
        with torch.no_grad():
            clean = features_fn(x).float()
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = cosine_distance(features_fn(x + delta).float(), clean).sum()
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta = delta + step_size * grad.sign()
                delta = delta.clamp(-eps, eps)
                delta = (x + delta).clamp(0, 1) - x
            delta = delta.detach()
    return (x + delta).detach()


def activation_bytes(model: torch.nn.Module, size: int) -> tuple[int, int]:
    """(sum, largest) of the fp32 bytes of every leaf module's output for one size x size image.

    The sum is what a backward keeps per image; the largest bounds what a forward holds at once.
    Measured with one forward of a zero image (hooks count the outputs; no gradients).
    """
    sizes: list[int] = []

    def hook(_module: torch.nn.Module, _inputs: object, output: object) -> None:
        outs = output if isinstance(output, (tuple, list)) else (output,)
        sizes.append(sum(4 * o.numel() for o in outs if isinstance(o, torch.Tensor)))

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device=device))
    finally:
        for h in handles:
            h.remove()
    return sum(sizes), max(sizes, default=0)


def batch_sizes(model: torch.nn.Module, size: int, budget_mb: float, cap: int) -> tuple[int, int]:
    """(images per corruption batch, images per attack batch) that fit ``budget_mb`` of activations.

    A forward holds about 4 of its largest activations per image (plus the fp32 input); the
    attack's forward + backward keeps every activation and its gradient (2 x the sum). Both are at
    least 1 and at most ``cap``.
    """
    total, largest = activation_bytes(model, size)
    budget = budget_mb * 2**20
    forward = 4 * largest + 4 * 3 * size * size
    backward = 2 * total + 4 * largest
    fit = lambda per_image: max(1, min(cap, int(budget // max(per_image, 1))))  # noqa: E731
    return fit(forward), fit(backward)
