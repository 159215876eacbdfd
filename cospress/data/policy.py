"""The view policy (what augmentation stage 1 records) and the layout of its view params, per version.

Version 1 (every store before RandAugment and random erasing): ``PARAM_NAMES``, 11 values per view.
Version 2 (a policy with ``rand_augment`` or ``erase_prob > 0``): ``PARAM_NAMES_V2``, the 11 of
version 1, then the erasing box and fill, then ``RA_SLOTS`` RandAugment slots of (op, value):

  erase_top, erase_left, erase_height, erase_width   box, fractions of the output size (height 0 = none)
  erase_r, erase_g, erase_b                          fill colour in [0, 1]
  erase_noise                                        0: a solid fill; n > 0: per-pixel gaussian noise
                                                     around the colour (std ``erasing.NOISE_STD``), from
                                                     the counter-based hash seeded by n (exact replay)
  ra{i}_op, ra{i}_value                              op number (0 = none, else 1 + index in
                                                     ``randaugment.OPS``) and the value it applies

A policy without the new options is version 1, with exactly version 1's dict and fingerprint, so
its stores are byte-identical to the stores written before version 2 existed. Replay tells the two
layouts apart by the number of values of a view.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from cospress.config import VIEW_SETTINGS as _V  # the defaults of the settings a stage exposes
from cospress.data.randaugment import RA_SLOTS, parse_rand_augment
from cospress.errors import ConfigError
from cospress.utils import sha256_json

VIEW_POLICY_VERSION = 2  # the newest version this code writes and reads
PARAM_NAMES: tuple[str, ...] = (
    "crop_top",
    "crop_left",
    "crop_height",
    "crop_width",
    "flip",
    "brightness",
    "contrast",
    "saturation",
    "hue",
    "grayscale",
    "blur_sigma",
)
ERASE_NAMES: tuple[str, ...] = (
    "erase_top",
    "erase_left",
    "erase_height",
    "erase_width",
    "erase_r",
    "erase_g",
    "erase_b",
    "erase_noise",
)
RA_NAMES: tuple[str, ...] = tuple(f"ra{i}_{f}" for i in range(RA_SLOTS) for f in ("op", "value"))
PARAM_NAMES_V2: tuple[str, ...] = PARAM_NAMES + ERASE_NAMES + RA_NAMES
NUM_PARAMS = len(PARAM_NAMES)  # version 1
NUM_PARAMS_V2 = len(PARAM_NAMES_V2)
IDX = {n: i for i, n in enumerate(PARAM_NAMES_V2)}
ERASE_MODES = ("pixel", "rand", "const")
_V2_FIELDS = ("rand_augment", "erase_prob", "erase_area", "erase_aspect", "erase_mode")


def param_names(version: int) -> tuple[str, ...]:
    """The view-param names of a policy version."""
    if version == 1:
        return PARAM_NAMES
    if version == 2:
        return PARAM_NAMES_V2
    raise ConfigError(
        f"view policy version {version} is unknown (this cospress knows 1 and 2): upgrade cospress"
    )


def layout_version(num_params: int) -> int:
    """The policy version of a view-param row of ``num_params`` values (11: version 1, 27: version 2)."""
    if num_params == NUM_PARAMS:
        return 1
    if num_params == NUM_PARAMS_V2:
        return 2
    raise ValueError(
        f"expected {NUM_PARAMS} (policy version 1) or {NUM_PARAMS_V2} (version 2) view params, got {num_params}"
    )


@dataclass(frozen=True)
class ViewPolicy:
    """The augmentation policy. Probabilities are in [0, 1]; jitter strengths as torchvision's ColorJitter.

    ``rand_augment`` is timm's RandAugment string (``rand-m9-mstd0.5-inc1``; empty = off), kept in a
    canonical form (``rand-m9-n2-mstd0.5-inc1``) so equal settings have equal fingerprints. Random
    erasing as timm's ``RandomErasing`` with one box: ``erase_area`` (fraction of the view),
    ``erase_aspect`` (h / w), ``erase_mode`` pixel (noise), rand (one random colour) or const.
    ``version`` is derived (1 without the version 2 options); a stored policy gives it explicitly.
    """

    scale: tuple[float, float] = (_V["scale_min"][0], _V["scale_max"][0])  # crop area, fraction of the image
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio w / h
    flip: float = _V["flip"][0]
    color_jitter: float = 0.0  # probability of applying brightness/contrast/saturation/hue
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale: float = 0.0
    blur: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # in pixels at 224 px
    version: int | None = None
    rand_augment: str = _V["rand_augment"][0]
    erase_prob: float = _V["erase_prob"][0]
    erase_area: tuple[float, float] = (0.02, 1 / 3)
    erase_aspect: tuple[float, float] = (0.3, 1 / 0.3)
    erase_mode: str = _V["erase_mode"][0]

    def __post_init__(self) -> None:
        for name in ("scale", "ratio", "blur_sigma", "erase_area", "erase_aspect"):
            lo, hi = (float(v) for v in getattr(self, name))
            object.__setattr__(self, name, (lo, hi))
            if not 0 < lo <= hi or (name == "scale" and hi > 1) or (name == "erase_area" and hi >= 1):
                raise ConfigError(
                    f"view policy {name}={(lo, hi)}: need 0 < low <= high (and scale <= 1, erase_area < 1)"
                )
        for name in ("flip", "color_jitter", "grayscale", "blur", "erase_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(
                    f"view policy {name}={getattr(self, name)}: a probability must be in [0, 1]"
                )
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ConfigError(f"view policy {name}={getattr(self, name)}: must be >= 0")
        if not 0.0 <= self.hue <= 0.5:
            raise ConfigError(f"view policy hue={self.hue}: must be in [0, 0.5]")
        if self.erase_mode not in ERASE_MODES:
            raise ConfigError(
                f"view policy erase_mode={self.erase_mode!r}: use one of {', '.join(ERASE_MODES)}"
            )
        spec = parse_rand_augment(self.rand_augment)
        object.__setattr__(self, "rand_augment", spec.canonical() if spec else "")
        needed = 2 if (spec is not None or self.erase_prob > 0) else 1
        version = needed if self.version is None else int(self.version)
        param_names(version)  # refuses an unknown version
        if version < needed:
            raise ConfigError("view policy version 1 has no RandAugment or random erasing: use version 2")
        object.__setattr__(self, "version", version)

    @property
    def param_names(self) -> tuple[str, ...]:
        return param_names(int(self.version))

    @property
    def num_params(self) -> int:
        return len(self.param_names)

    def to_dict(self) -> dict[str, Any]:
        """Plain types; a version 1 policy has exactly the keys it had before version 2 existed."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        if self.version == 1:
            for name in _V2_FIELDS:
                d.pop(name)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViewPolicy:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown view policy fields {unknown}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @classmethod
    def from_settings(cls, cfg: Any) -> ViewPolicy:
        """The one builder from a stage's settings (``config.view_setting`` fields: scale_min,
        scale_max, flip, rand_augment, erase_prob, erase_mode, and where the stage has them
        color_jitter, grayscale, blur); a bad RandAugment string or probability fails here, in one line."""
        names = ("flip", "color_jitter", "grayscale", "blur", "rand_augment", "erase_prob", "erase_mode")
        given = {n: getattr(cfg, n) for n in names if hasattr(cfg, n)}
        return cls(scale=(cfg.scale_min, cfg.scale_max), **given)

    def fingerprint(self) -> str:
        """sha256 of :meth:`to_dict` (sorted keys): equal policies have equal fingerprints."""
        return sha256_json(self.to_dict())


def stored_policy(view_policy: dict | None, num_params: int, where: str = "the store") -> ViewPolicy:
    """The policy a store recorded, checked against its P; a one-line ConfigError for a version this
    code does not know (a newer cospress wrote it) or a P that is not the policy's."""
    try:
        policy = ViewPolicy.from_dict(dict(view_policy or {}))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if policy.num_params != num_params:
        raise ConfigError(
            f"{where} records {num_params} view params per view, its view policy version "
            f"{policy.version} has {policy.num_params}: the store is damaged or from another tool"
        )
    return policy
