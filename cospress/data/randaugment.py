"""RandAugment as timm draws it (``rand-mM-nN-mstdS-inc1``), recorded per view and replayed batched.

Sampling follows ``timm.data.auto_augment.RandAugment``: N ops chosen uniformly with replacement from
timm's 15 (the ``inc1`` set when asked), each applied with probability p (0.5), its magnitude drawn
from N(M, S) (uniform in [0, M] for S > 100) and clipped to [0, mmax or 10], turned into the op's
argument by timm's level function (random sign where timm has one). What a view records is that
argument: the value actually applied (degrees, shear factor, translation as a fraction of the view,
bits kept, threshold, enhance factor), never the magnitude, so replay needs no RNG and no timm.

Replay (:func:`apply_rand_augment`) works on the uint8 grid as timm's PIL ops do (values rounded to
0..255 first, PIL's truncations kept) and is one code for the per-image and the batched path: the
ops of a slot are applied to all views that have them at once (one kernel group per op, not per
view). Geometric ops are affine maps in normalized coordinates of the (square) view, so they are the
same transform at every resolution; they resample bilinearly, with PIL's rule at the border (a point
inside the image uses edge-clamped neighbours, a point outside takes the fill ``FILL``, timm's fill
for ImageNet-mean normalisation). Against timm's PIL implementation applied with the recorded value
(tests/test_randaugment.py): at most 1 grey level for every op except Equalize (exact) and the
geometric ops (at most 1 grey level on 99% of the pixels, the rest at the edge of the rotated image).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cospress.errors import ConfigError
from cospress.runtime import to_device

RA_SLOTS = 4  # op slots recorded per view (n <= 4); unused slots are zeros (no op)
OPS: tuple[str, ...] = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
    "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)  # fmt: skip
GEOMETRIC = frozenset({"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"})
FILL = (124, 116, 104)  # timm create_transform's img_mean for ImageNet mean (0.485, 0.456, 0.406)
_LEVEL_DENOM = 10.0
_INCREASING = {"Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness"}
_FORM = "expected timm's form rand-m9-n2-mstd0.5-inc1 (sections mM, nN (1-4), mstdS, mmaxM, pP, inc0/1)"


@dataclass(frozen=True)
class RandAugmentSpec:
    """A parsed RandAugment string: magnitude m, n ops, magnitude std, max, op probability, inc set."""

    magnitude: int = 10
    num_ops: int = 2
    std: float = 0.0  # > 100 = uniform in [0, magnitude]
    magnitude_max: int | None = None
    prob: float = 0.5
    increasing: bool = False

    def canonical(self) -> str:
        s = f"rand-m{self.magnitude}-n{self.num_ops}"
        s += f"-mstd{self.std:g}" if self.std else ""
        s += f"-mmax{self.magnitude_max}" if self.magnitude_max is not None else ""
        s += f"-p{self.prob:g}" if self.prob != 0.5 else ""
        return s + f"-inc{int(self.increasing)}"


def parse_rand_augment(text: str) -> RandAugmentSpec | None:
    """timm's ``rand-...`` config string; '' = off. Raises a one-line ConfigError on a bad string."""
    text = (text or "").strip()
    if not text:
        return None
    parts = text.split("-")
    if parts[0] != "rand":
        raise ConfigError(f"rand_augment {text!r} does not start with 'rand': {_FORM}")
    kw: dict = {}
    names = {
        "m": "magnitude",
        "n": "num_ops",
        "mstd": "std",
        "mmax": "magnitude_max",
        "p": "prob",
        "inc": "increasing",
    }
    for part in parts[1:]:
        m = re.fullmatch(r"([a-z]+)(\d[\d.]*)", part)
        if not m or m.group(1) not in names:
            raise ConfigError(f"rand_augment {text!r}: section {part!r} is unknown; {_FORM}")
        key, val = m.groups()
        try:
            value = float(val) if key in ("mstd", "p") else int(val)
        except ValueError:
            raise ConfigError(f"rand_augment {text!r}: {part!r} needs an integer; {_FORM}") from None
        kw[names[key]] = bool(value) if key == "inc" else value
    spec = RandAugmentSpec(**kw)
    if not 1 <= spec.num_ops <= RA_SLOTS or not 0 <= spec.prob <= 1 or spec.magnitude < 0:
        raise ConfigError(f"rand_augment {text!r}: need 1 <= n <= {RA_SLOTS}, 0 <= p <= 1, m >= 0; {_FORM}")
    return spec


def _level(name: str, increasing: bool, mag: float, negative: bool) -> float:
    """timm's level -> argument of op `name` (the value a view records)."""
    sign = -1.0 if negative else 1.0
    frac = mag / _LEVEL_DENOM
    inc = increasing and name in _INCREASING
    if name == "Rotate":
        return sign * frac * 30.0
    if name in ("ShearX", "ShearY"):
        return sign * frac * 0.3
    if name in ("TranslateXRel", "TranslateYRel"):
        return sign * frac * 0.45
    if name == "Posterize":
        return float(4 - int(frac * 4) if inc else int(frac * 4))
    if name == "Solarize":
        return float(256 - min(256, int(frac * 256)) if inc else min(256, int(frac * 256)))
    if name == "SolarizeAdd":
        return float(min(128, int(frac * 110)))
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return max(0.1, 1.0 + sign * frac * 0.9) if inc else frac * 1.8 + 0.1
    return 0.0  # AutoContrast, Equalize, Invert take no argument


def sample_rand_augment(spec: RandAugmentSpec, rng: np.random.Generator) -> np.ndarray:
    """float32 [2 * RA_SLOTS]: (op number, value) per slot; a fixed number of draws whatever is chosen."""
    u = rng.random((RA_SLOTS, 4))  # op choice, apply gate, sign, uniform magnitude
    z = rng.standard_normal(RA_SLOTS)
    out = np.zeros(2 * RA_SLOTS, np.float64)
    upper = spec.magnitude_max or _LEVEL_DENOM
    for i in range(spec.num_ops):
        op = min(int(u[i, 0] * len(OPS)), len(OPS) - 1)
        if spec.prob < 1.0 and u[i, 1] > spec.prob:  # timm: skipped when random() > prob
            continue
        mag = float(spec.magnitude)
        if spec.std > 100:
            mag = u[i, 3] * spec.magnitude
        elif spec.std > 0:
            mag = spec.magnitude + spec.std * z[i]
        mag = max(0.0, min(mag, upper))
        out[2 * i] = op + 1
        out[2 * i + 1] = _level(OPS[op], spec.increasing, mag, negative=u[i, 2] > 0.5)
    return out.astype(np.float32)


# ---------------------------------------------------------------------------------------------- replay
# y: float [n, 3, S, S] on the 0..255 grid; v: float [n] (the recorded values, on y's device).


def _trunc(v: torch.Tensor) -> torch.Tensor:
    """PIL's float -> UINT8 (truncation, clipped); the epsilon absorbs float32 error on exact integers."""
    return v.add(1e-3).floor_().clamp_(0.0, 255.0)


def _luma(y: torch.Tensor) -> torch.Tensor:
    """PIL's "L" conversion, exact in float32: (19595 R + 38470 G + 7471 B + 2^15) >> 16; [n, 1, S, S]."""
    r, g, b = y.unbind(1)
    return torch.floor((r * 19595.0 + g * 38470.0 + b * 7471.0 + 32768.0) / 65536.0).unsqueeze(1)


def _blend(degenerate: torch.Tensor, y: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """PIL ``Image.blend(degenerate, y, f)`` = degenerate + f (y - degenerate), truncated to uint8."""
    return _trunc(degenerate + f.view(-1, 1, 1, 1) * (y - degenerate))


def _autocontrast(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    lo, hi = y.amin((2, 3), keepdim=True), y.amax((2, 3), keepdim=True)
    scale = 255.0 / (hi - lo).clamp_min(1.0)
    return torch.where(hi > lo, _trunc(y * scale - lo * scale), y)


def _equalize(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.equalize per channel, in integers (exact on every device)."""
    n, c, hh, ww = y.shape
    q = y.to(torch.int64).reshape(n * c, hh * ww)
    offs = torch.arange(n * c, device=y.device).unsqueeze(1) * 256
    hist = torch.bincount((q + offs).flatten(), minlength=n * c * 256).reshape(n * c, 256)
    last_bin = torch.where(hist > 0, torch.arange(256, device=y.device), -1).amax(1, keepdim=True)
    last = hist.gather(1, last_bin.clamp_min(0))
    step = (hh * ww - last) // 255
    before = hist.cumsum(1) - hist  # pixels below each value
    lut = ((step // 2 + before) // step.clamp_min(1)).clamp_max(255)
    keep = ((hist > 0).sum(1, keepdim=True) <= 1) | (step == 0)
    lut = torch.where(keep, torch.arange(256, device=y.device), lut)
    return lut.gather(1, q).reshape(n, c, hh, ww).to(y.dtype)


def _posterize(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    shift = torch.pow(2.0, 8.0 - v.round().clamp(0.0, 8.0)).view(-1, 1, 1, 1)
    return torch.floor(y / shift) * shift


def _solarize(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.where(y < v.view(-1, 1, 1, 1), y, 255.0 - y)


def _solarize_add(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.where(y < 128.0, (y + v.view(-1, 1, 1, 1)).clamp_max(255.0), y)


def _contrast(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    mean = torch.floor(_luma(y).double().mean((1, 2, 3), keepdim=True) + 0.5).to(y.dtype)
    return _blend(mean.expand_as(y), y, v)


def _sharpness(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter ([[1,1,1],[1,5,1],[1,1,1]] / 13, edge pixels kept) blended with the view."""
    n, c, hh, ww = y.shape
    k = torch.ones(3, 3, dtype=y.dtype, device=y.device)
    k[1, 1] = 5.0
    smooth = F.conv2d(y.reshape(n * c, 1, hh, ww), (k / 13.0)[None, None]).reshape(n, c, hh - 2, ww - 2)
    degenerate = y.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth.add(0.5).floor_().clamp_(0.0, 255.0)
    return _blend(degenerate, y, v)


_POINTWISE = {
    "AutoContrast": _autocontrast,
    "Equalize": _equalize,
    "Invert": lambda y, v: 255.0 - y,
    "Posterize": _posterize,
    "Solarize": _solarize,
    "SolarizeAdd": _solarize_add,
    "Color": lambda y, v: _blend(_luma(y).expand_as(y), y, v),
    "Contrast": _contrast,
    "Brightness": lambda y, v: _blend(torch.zeros_like(y), y, v),
    "Sharpness": _sharpness,
}


def _affine(names: list[str], values: list[float]) -> torch.Tensor:
    """float64 [n, 2, 3]: output (u, v, 1) -> input (u, v) in the view's normalized [0, 1] coordinates.

    timm's PIL matrices on a square view, with pixel sizes divided out (translate is a fraction)."""
    out = np.zeros((len(names), 2, 3))
    for i, (name, val) in enumerate(zip(names, values, strict=True)):
        m = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        if name == "ShearX":
            m[0, 1] = val
        elif name == "ShearY":
            m[1, 0] = val
        elif name == "TranslateXRel":
            m[0, 2] = val
        elif name == "TranslateYRel":
            m[1, 2] = val
        else:  # Rotate: PIL rotates counter-clockwise by `val` degrees about the centre
            a = -math.radians(val)
            cos, sin = round(math.cos(a), 15), round(math.sin(a), 15)
            m = np.array([[cos, sin, 0.0], [-sin, cos, 0.0]])
            m[:, 2] = np.array([0.5, 0.5]) - m[:, :2] @ np.array([0.5, 0.5])
        out[i] = m
    return torch.from_numpy(out)


def _geometric(y: torch.Tensor, names: list[str], values: list[float]) -> torch.Tensor:
    """All geometric ops of one slot in one grid_sample: bilinear, PIL's border rule, fill FILL."""
    n, _, size, _ = y.shape
    a = _affine(names, values)  # [n, 2, 3] in [0, 1] coordinates -> the same map in grid_sample's [-1, 1]
    theta = torch.cat([a[:, :, :2], a[:, :, :2].sum(2, keepdim=True) + 2 * a[:, :, 2:] - 1], 2)
    # the grid is built where the pixels are (float64, pixel centres): only theta (n x 48 bytes) is copied
    grid = F.affine_grid(to_device(theta, y.device), [n, 1, size, size], align_corners=False)
    inside = ((grid >= -1) & (grid < 1)).all(-1).unsqueeze(1)  # PIL: outside -> the fill
    warped = F.grid_sample(
        y, grid.to(torch.float32), mode="bilinear", padding_mode="border", align_corners=False
    )
    fill = torch.stack([y.new_full((), float(v)) for v in FILL]).view(1, 3, 1, 1)  # filled there: no copy
    return torch.where(inside, _trunc(warped), fill)


def apply_rand_augment(x: torch.Tensor, ops: torch.Tensor) -> torch.Tensor:
    """Replay the recorded RandAugment slots on float [B, 3, S, S] in [0, 1]; ops: CPU float [B, 2 * RA_SLOTS].

    Returns float [B, 3, S, S] in [0, 1] (on the uint8 grid for the views with an op)."""
    op_ids = ops[:, 0::2].round().to(torch.int64)
    if not bool((op_ids > 0).any()):
        return x
    vals = ops[:, 1::2].to(torch.float64)
    rows = torch.nonzero((op_ids > 0).any(1)).flatten()
    rows_dev = to_device(rows, x.device)
    y = x[rows_dev].mul(255.0).round_()
    sub_ids, sub_vals = op_ids[rows], vals[rows]
    for slot in range(RA_SLOTS):
        geo = [i for i in range(len(rows)) if 0 < sub_ids[i, slot] and OPS[sub_ids[i, slot] - 1] in GEOMETRIC]
        if geo:
            idx = to_device(torch.tensor(geo), x.device)
            names = [OPS[int(sub_ids[i, slot]) - 1] for i in geo]
            y.index_copy_(0, idx, _geometric(y[idx], names, [float(sub_vals[i, slot]) for i in geo]))
        for op in sorted(set(sub_ids[:, slot].tolist()) - {0}):
            name = OPS[op - 1]
            if name in GEOMETRIC:
                continue
            sel = torch.nonzero(sub_ids[:, slot] == op).flatten()
            idx = to_device(sel, x.device)
            v = to_device(sub_vals[sel, slot].to(torch.float32), x.device)
            y.index_copy_(0, idx, _POINTWISE[name](y[idx], v))
    out = x.clone()
    out.index_copy_(0, rows_dev, y.div_(255.0))
    return out
