"""Seeded view parameters and their replay (per image and batched)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cospress.data.views import (
    NUM_PARAMS,
    PARAM_NAMES,
    ViewPolicy,
    center_view_params,
    replay_view,
    replay_views_batch,
    sample_view_params,
)
from cospress.errors import ConfigError

IDX = {n: i for i, n in enumerate(PARAM_NAMES)}
FULL = ViewPolicy(color_jitter=0.8, grayscale=0.2, blur=0.5)


def _smooth_image(width: int = 200, height: int = 150) -> torch.Tensor:
    """uint8 [3, H, W]: low-frequency colour content, so resampling at two sizes agrees."""
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    chans = [0.5 + 0.4 * torch.sin(6 * x + 2 * y), 0.5 + 0.4 * torch.cos(5 * y - x), x * 0.6 + y * 0.3]
    return (torch.stack(chans) * 255).round().to(torch.uint8)


def _random_images(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(20, 90, (n, 2), generator=g)
    return [torch.randint(0, 256, (3, int(h), int(w)), generator=g, dtype=torch.uint8) for h, w in sizes]


def test_policy_dict_round_trip_and_fingerprint():
    pol = ViewPolicy(scale=(0.2, 1.0), color_jitter=0.8)
    d = pol.to_dict()
    assert d["scale"] == [0.2, 1.0] and d["version"] == 1
    assert ViewPolicy.from_dict(d) == pol
    assert ViewPolicy.from_dict(d).fingerprint() == pol.fingerprint() != ViewPolicy().fingerprint()
    assert len(pol.fingerprint()) == 64
    with pytest.raises(ConfigError, match="unknown view policy fields"):
        ViewPolicy.from_dict({**d, "mixup": 0.2})
    for bad in ({"flip": 1.5}, {"scale": (0.5, 0.1)}, {"hue": 0.7}, {"brightness": -1.0}):
        with pytest.raises(ConfigError):
            ViewPolicy(**bad)


def test_params_are_keyed_not_ordered():
    calls = [(s, k, v) for s in (0, 1) for k in ("a", "b", "img/0001.jpg") for v in range(3)]
    first = {c: sample_view_params(FULL, *c, 640, 480) for c in calls}
    again = {c: sample_view_params(FULL, *c, 640, 480) for c in reversed(calls)}
    for c in calls:
        p = first[c]
        assert p.dtype == np.float32 and p.shape == (NUM_PARAMS,)
        assert np.array_equal(p, again[c])
    values = {first[c].tobytes() for c in calls}
    assert len(values) == len(calls)  # views, keys and seeds all differ


def test_crops_in_bounds_and_ranges_respected():
    width, height = 300, 200
    ps = np.stack([sample_view_params(FULL, 7, f"k{i}", i % 3, width, height) for i in range(600)])
    top, left, ch, cw = ps[:, 0], ps[:, 1], ps[:, 2], ps[:, 3]
    eps = 1e-6
    assert (
        (top >= 0).all()
        and (left >= 0).all()
        and (top + ch <= 1 + eps).all()
        and (left + cw <= 1 + eps).all()
    )
    area = ch * cw
    ratio = (cw * width) / (ch * height)
    assert area.min() >= 0.08 - 0.01 and area.max() <= 1.0 + eps
    assert area.min() < 0.15 and area.max() > 0.75  # the whole range is used (0.89 at most for 3:2)
    assert ratio.min() >= 0.75 * 0.97 and ratio.max() <= (4 / 3) * 1.03
    assert ratio.min() < 0.8 and ratio.max() > 1.25
    # crops are integral pixel boxes of the real image
    assert np.allclose(ch * height, np.round(ch * height), atol=1e-3)
    assert abs(ps[:, IDX["flip"]].mean() - 0.5) < 0.08
    assert set(np.unique(ps[:, IDX["flip"]])) == {0.0, 1.0}
    jittered = ps[:, IDX["brightness"]] != 1.0
    assert abs(jittered.mean() - 0.8) < 0.08
    assert ps[:, IDX["brightness"]].min() >= 0.6 and ps[:, IDX["brightness"]].max() <= 1.4
    assert ps[:, IDX["saturation"]].min() >= 0.8 and ps[:, IDX["saturation"]].max() <= 1.2
    assert np.abs(ps[:, IDX["hue"]]).max() <= 0.1 and ps[:, IDX["hue"]].min() < -0.05
    assert abs(ps[:, IDX["grayscale"]].mean() - 0.2) < 0.07
    sig = ps[:, IDX["blur_sigma"]] * 224
    blurred = sig > 0
    assert abs(blurred.mean() - 0.5) < 0.08 and sig[blurred].min() >= 0.1 - 1e-4 and sig.max() <= 2.0 + 1e-4


def test_default_policy_has_identity_colour_and_fallback_crop():
    ps = np.stack([sample_view_params(ViewPolicy(), 0, f"k{i}", 0, 64, 64) for i in range(50)])
    ident = center_view_params(64, 64)
    assert np.array_equal(ps[:, 5:], np.broadcast_to(ident[5:], ps[:, 5:].shape))
    # an extreme panorama: no try fits the ratio, so the centre crop with a clamped ratio is used
    p = sample_view_params(ViewPolicy(scale=(1.0, 1.0)), 0, "pano", 0, 1000, 10)
    assert np.allclose(p[:4], [0.0, (1000 - 13) // 2 / 1000, 1.0, 13 / 1000])


def test_center_view_is_the_full_image_resized():
    img = _smooth_image(90, 60)
    out = replay_view(img, center_view_params(90, 60), 32)
    ref = F.interpolate(img[None].float() / 255, size=(32, 32), mode="bilinear", antialias=True)
    ref = (ref[0] * 255).round().clamp(0, 255).to(torch.uint8)
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
    assert (out.int() - ref.int()).abs().max() <= 1


def test_replay_accepts_pil_and_crops_the_box():
    img = _smooth_image(120, 80)
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    p = center_view_params(120, 80)
    p[:4] = (10 / 80, 30 / 120, 40 / 80, 40 / 120)  # a 40 x 40 pixel box at (top 10, left 30)
    out = replay_view(pil, p, 40)
    assert torch.equal(out, replay_view(img, p, 40))
    assert (out.int() - img[:, 10:50, 30:70].int()).abs().max() <= 1  # same size: a plain crop


def test_two_resolutions_show_the_same_content():
    img = _smooth_image()
    for view in range(4):
        p = sample_view_params(ViewPolicy(color_jitter=1.0), 3, "x", view, 200, 150)
        big = replay_view(img, p, 128).float()[None]
        small = replay_view(img, p, 32).float()
        down = F.interpolate(big, size=(32, 32), mode="bilinear", antialias=True)[0]
        assert (down - small).abs().mean() < 2.0
        other = replay_view(img, sample_view_params(ViewPolicy(), 3, "x", view + 10, 200, 150), 32).float()
        assert (other - small).abs().mean() > 4.0  # a different view does differ


def test_flip_grayscale_and_blur():
    img = _smooth_image(64, 48)
    p = sample_view_params(ViewPolicy(flip=0.0), 0, "f", 0, 64, 48)
    q = p.copy()
    q[IDX["flip"]] = 1.0
    assert torch.equal(replay_view(img, q, 24), replay_view(img, p, 24).flip(-1))
    g = p.copy()
    g[IDX["grayscale"]] = 1.0
    gray = replay_view(img, g, 24)
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    noise = torch.randint(0, 256, (3, 48, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    b = p.copy()
    b[IDX["blur_sigma"]] = 2.0 / 224 * 4  # 2 px at 24 px output
    assert replay_view(noise, b, 24).float().std() < 0.6 * replay_view(noise, p, 24).float().std()


def test_batched_replay_matches_per_image():
    imgs = _random_images(24)
    imgs[0] = _smooth_image(70, 50)
    ps = np.stack(
        [sample_view_params(FULL, 1, f"k{i}", 0, im.shape[2], im.shape[1]) for i, im in enumerate(imgs)]
    )
    ps[1, IDX["hue"]] = 0.5  # extremes of the colour ops
    ps[2, [IDX["brightness"], IDX["contrast"], IDX["saturation"]]] = (0.0, 0.0, 0.0)
    ps[3, IDX["blur_sigma"]] = 2.0 / 224
    assert (ps[:, IDX["hue"]] != 0).sum() > 5 and (ps[:, IDX["blur_sigma"]] > 0).sum() > 5
    for size in (16, 33):
        batch = replay_views_batch(imgs, torch.from_numpy(ps), size)
        single = torch.stack([replay_view(im, p, size) for im, p in zip(imgs, ps, strict=True)])
        assert batch.dtype == torch.uint8 and batch.shape == (24, 3, size, size)
        assert (batch.int() - single.int()).abs().max() <= 1
    centre = replay_views_batch(imgs[:2], np.stack([center_view_params(1, 1)] * 2), 16)
    assert torch.equal(centre[1], replay_view(imgs[1], center_view_params(1, 1), 16))
    same = torch.stack([im[:, :20, :20] for im in imgs])  # a [B, 3, H, W] tensor input
    sp = np.stack([sample_view_params(FULL, 2, f"k{i}", 1, 20, 20) for i in range(24)])
    batch = replay_views_batch(same, sp, 20)
    single = torch.stack([replay_view(im, p, 20) for im, p in zip(same, sp, strict=True)])
    assert (batch.int() - single.int()).abs().max() <= 1


def test_replay_rejects_bad_inputs():
    img = _smooth_image(20, 20)
    with pytest.raises(ValueError, match="view params"):
        replay_view(img, np.zeros(3, np.float32), 8)
    with pytest.raises(ValueError, match="uint8"):
        replay_view(img.float(), center_view_params(20, 20), 8)
    with pytest.raises(ValueError, match="params must be"):
        replay_views_batch([img], np.zeros((2, NUM_PARAMS), np.float32), 8)
    assert math.isclose(float(center_view_params(5, 5)[IDX["crop_width"]]), 1.0)
