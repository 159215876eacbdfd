"""RandAugment: timm's config string, timm's draws, and replay against timm's own PIL ops."""

from __future__ import annotations

import random

import numpy as np
import pytest
import timm.data.auto_augment as taa
import torch
from PIL import Image

from cospress.data.randaugment import (
    FILL,
    GEOMETRIC,
    OPS,
    RA_SLOTS,
    apply_rand_augment,
    parse_rand_augment,
    sample_rand_augment,
)
from cospress.errors import ConfigError

TIMM_OPS = {
    "AutoContrast": taa.auto_contrast, "Equalize": taa.equalize, "Invert": taa.invert, "Rotate": taa.rotate,
    "Posterize": taa.posterize, "Solarize": taa.solarize, "SolarizeAdd": taa.solarize_add, "Color": taa.color,
    "Contrast": taa.contrast, "Brightness": taa.brightness, "Sharpness": taa.sharpness, "ShearX": taa.shear_x,
    "ShearY": taa.shear_y, "TranslateXRel": taa.translate_x_rel, "TranslateYRel": taa.translate_y_rel,
}  # fmt: skip
VALUES = {
    "Rotate": [17.3, -29.0], "Posterize": [1, 2, 4], "Solarize": [0, 97, 256], "SolarizeAdd": [40, 99],
    "Color": [0.1, 1.7], "Contrast": [0.3, 1.9], "Brightness": [0.2, 1.8], "Sharpness": [0.1, 1.9],
    "ShearX": [0.27, -0.3], "ShearY": [-0.2137, 0.11], "TranslateXRel": [0.4, -0.13], "TranslateYRel": [-0.33],
}  # fmt: skip


def _image(size: int, seed: int) -> np.ndarray:
    """uint8 [S, S, 3]: smooth colour content plus noise (every grey level and edge case shows)."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    chans = [0.5 + 0.4 * np.sin(6 * x + 2 * y + g.random()), 0.5 + 0.4 * np.cos(5 * y - x), x * 0.6 + y * 0.3]
    return (
        np.clip(np.stack(chans, -1) * 255 + g.normal(0, 12, (size, size, 3)), 0, 255).round().astype(np.uint8)
    )


def _ours(arr: np.ndarray, name: str, value: float) -> np.ndarray:
    x = torch.from_numpy(arr).permute(2, 0, 1).float()[None] / 255
    ops = torch.zeros(1, 2 * RA_SLOTS)
    ops[0, 0], ops[0, 1] = OPS.index(name) + 1, value
    return (apply_rand_augment(x, ops)[0] * 255).round().permute(1, 2, 0).numpy().astype(int)


def _timm(arr: np.ndarray, name: str, value: float) -> np.ndarray:
    img = Image.fromarray(arr)
    if name in ("AutoContrast", "Equalize", "Invert"):
        return np.asarray(TIMM_OPS[name](img)).astype(int)
    kw = {"resample": Image.BILINEAR, "fillcolor": FILL} if name in GEOMETRIC else {}
    return np.asarray(TIMM_OPS[name](img, value, **kw)).astype(int)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("size", [37, 64])
def test_replay_equals_timm_ops_applied_with_the_recorded_value(name, size):
    """Stated tolerance: <= 1 grey level for every op; geometric ops: >= 99% of the pixels within 1
    level, the rest on the edge of the transformed image (inside / outside decided by float rounding)."""
    arr = _image(size, seed=size)
    if name == "AutoContrast":
        arr = arr // 2 + 40  # a narrow range, so that it stretches
    changed = False
    for value in VALUES.get(name, [0.0]):
        ours = _ours(arr, name, value)
        diff = np.abs(ours - _timm(arr, name, value))
        if name in GEOMETRIC:
            assert (diff <= 1).mean() >= 0.99 and diff.mean() < 0.5, (name, value, diff.max())
        else:
            assert diff.max() <= 1, (name, value, diff.max())
        changed |= not np.array_equal(ours, arr)
    assert changed, f"{name} left the image as it was"


def test_posterize_to_zero_bits_is_black():
    """timm's PosterizeIncreasing at magnitude 10 keeps 0 bits; Pillow >= 10 refuses that, older Pillow
    (which timm was written against) gives black, and so does replay."""
    arr = _image(16, 0)
    assert _ours(arr, "Posterize", 0).max() == 0


def test_geometric_ops_are_the_same_transform_at_two_sizes():
    """Rotate / shear / translate in normalized coordinates: a 4x larger view is the same picture."""
    from cospress.data.replay import replay_view
    from cospress.data.views import ViewPolicy, center_view_params

    big = torch.from_numpy(np.kron(_image(24, 1), np.ones((4, 4, 1), np.uint8))).permute(2, 0, 1).contiguous()
    p = center_view_params(96, 96, 2)
    base = ViewPolicy(erase_prob=0.5).param_names.index("ra0_op")
    for name, value in (("Rotate", 23.0), ("ShearX", 0.25), ("TranslateYRel", -0.3)):
        p[base], p[base + 1] = OPS.index(name) + 1, value
        small = replay_view(big, p, 24).float()
        large = replay_view(big, p, 96).float()
        down = torch.nn.functional.avg_pool2d(large[None], 4)[0]
        assert (small - down).abs().mean() < 6, name
        plain = replay_view(big, center_view_params(96, 96, 2), 24).float()
        assert (small - plain).abs().mean() > 10, name  # the op did something


def test_parse_follows_timm_and_is_canonical():
    spec = parse_rand_augment("rand-m9-mstd0.5-inc1")
    assert (spec.magnitude, spec.num_ops, spec.std, spec.prob, spec.increasing) == (9, 2, 0.5, 0.5, True)
    assert spec.canonical() == "rand-m9-n2-mstd0.5-inc1"
    assert parse_rand_augment("rand-inc1-mstd0.5-m9") == spec
    assert parse_rand_augment(spec.canonical()) == spec
    assert parse_rand_augment("") is None
    assert parse_rand_augment("rand-m7-n3-mstd101-mmax12-p0.7").std > 100
    for bad, what in (
        ("randaug-m9", "does not start with 'rand'"),
        ("rand-m9-x3", "section 'x3' is unknown"),
        ("rand-m9-n9", "n <= 4"),
        ("rand-m9-tweights", "section 'tweights' is unknown"),
        ("rand-m9.5", "needs an integer"),
    ):
        with pytest.raises(ConfigError, match=what) as e:
            parse_rand_augment(bad)
        assert "rand-m9-n2-mstd0.5-inc1" in str(e.value) and "\n" not in str(e.value)


def _timm_levels(config: str, trials: int) -> dict[str, list[float]]:
    """The arguments timm's own RandAugment passes to each op (ops wrapped to record them)."""
    seen: dict[str, list[float]] = {}
    ra = taa.rand_augment_transform(config, {"img_mean": FILL})
    for op in ra.ops:
        name = op.name.replace("Increasing", "")

        def spy(img, *args, _name=name, **kw):
            seen.setdefault(_name, []).append(float(args[0]) if args else 0.0)
            return img

        op.aug_fn = spy
    random.seed(0)
    np.random.seed(0)
    img = Image.new("RGB", (8, 8))
    for _ in range(trials):
        ra(img)
    return seen


def test_draws_match_timms_distribution():
    """Which ops, how often, and the range of each argument: as timm's RandAugment (same config)."""
    config, trials = "rand-m9-mstd0.5-inc1", 6000
    want = _timm_levels(config, trials)
    spec = parse_rand_augment(config)
    got: dict[str, list[float]] = {}
    for t in range(trials):
        slots = sample_rand_augment(spec, np.random.default_rng(t))
        assert not slots[2 * spec.num_ops :].any()  # unused slots are zero padding
        for op, value in slots.reshape(-1, 2):
            if op:
                got.setdefault(OPS[int(op) - 1], []).append(float(value))
    assert set(got) == set(want) == set(OPS)
    total_got, total_want = sum(map(len, got.values())), sum(map(len, want.values()))
    assert abs(total_got - total_want) < 0.05 * total_want  # ~ n * p ops per view
    for name in OPS:
        g, w = np.array(got[name]), np.array(want[name])
        assert abs(len(g) - len(w)) < 0.3 * len(w) + 20, name
        assert abs(g.mean() - w.mean()) <= 0.15 * (w.std() + abs(w.mean())) + 1e-6, name
        assert abs(g.std() - w.std()) <= 0.2 * w.std() + 0.05, name
        level = taa.LEVEL_TO_ARG[name + ("Increasing" if name + "Increasing" in taa.LEVEL_TO_ARG else "")]
        if level is not None:  # every recorded value is one timm's level function can give, for m in [0, 10]
            args = [level(m, {})[0] for m in np.linspace(0, 10, 101) for _ in range(16)]
            assert min(args) - 1e-5 <= g.min() and g.max() <= max(args) + 1e-5, name
