"""Batched crop + resize (matmuls with PyTorch's antialias weights) and the pre-shrink of huge downscales."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cospress.data import resize as rz
from cospress.data.views import (
    ViewPolicy,
    center_view_params,
    replay_view,
    replay_views_batch,
    sample_view_params,
)

FULL = ViewPolicy(color_jitter=0.8, grayscale=0.2, blur=0.5)


def _images(n: int, seed: int = 0, lo: int = 12, hi: int = 90) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(lo, hi, (n, 2), generator=g)
    return [torch.randint(0, 256, (3, int(h), int(w)), generator=g, dtype=torch.uint8) for h, w in sizes]


def _loop(imgs, ps, size):
    out = []
    for img, p in zip(imgs, ps, strict=True):
        top, left, h, w = rz.box_pixels(p, img.shape[2], img.shape[1])
        crop = img[None, :, top : top + h, left : left + w].float() / 255
        out.append(
            F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        )
    return torch.cat(out)


def test_matmul_resize_equals_interpolate():
    """Stated tolerance: < 1e-4 in [0, 1] (float32 sums in another order); up- and downscales, repeats."""
    imgs = _images(20)
    imgs = imgs + [imgs[0]] * 5 + [imgs[3]] * 2  # the views of one image share its tensor
    ps = torch.from_numpy(
        np.stack(
            [sample_view_params(FULL, 0, f"k{i}", i, im.shape[2], im.shape[1]) for i, im in enumerate(imgs)]
        )
    )
    for size in (8, 32, 57):
        got = rz.batched_crop_resize(imgs, ps, size)
        want = _loop(imgs, ps, size)
        assert got.shape == want.shape and (got - want).abs().max() < 1e-4, size


def test_big_images_are_groups_of_their_own(monkeypatch):
    monkeypatch.setattr(rz, "_BIG_PIXELS", 40 * 40)
    imgs = _images(10, seed=1, lo=20, hi=80)
    assert any(i.shape[1] * i.shape[2] > 1600 for i in imgs) and any(
        i.shape[1] * i.shape[2] <= 1600 for i in imgs
    )
    groups = rz._groups(imgs)
    assert len(groups) > 1 and sorted(b for g in groups for v in g for b in v) == list(range(10))
    big = [g for g in groups if any(imgs[v[0]].shape[1] * imgs[v[0]].shape[2] > 1600 for v in g)]
    assert all(len(g) == 1 for g in big)  # each big image is a group of its own
    ps = torch.from_numpy(
        np.stack(
            [sample_view_params(FULL, 0, f"k{i}", 0, im.shape[2], im.shape[1]) for i, im in enumerate(imgs)]
        )
    )
    assert (rz.batched_crop_resize(imgs, ps, 24) - _loop(imgs, ps, 24)).abs().max() < 1e-4


def test_batched_replay_equals_per_image_replay():
    imgs = _images(16, seed=2)
    ps = np.stack(
        [sample_view_params(FULL, 1, f"k{i}", 0, im.shape[2], im.shape[1]) for i, im in enumerate(imgs)]
    )
    single = torch.stack([replay_view(im, p, 28) for im, p in zip(imgs, ps, strict=True)]).int()
    for batched in (True, False):
        diff = (replay_views_batch(imgs, ps, 28, batched=batched).int() - single).abs()
        assert diff.max() <= 1, batched


def test_a_downscale_over_100x_is_preshrunk_and_close_to_the_direct_resize():
    """A 7,000 x 90 px crop to 64 px (109x on one axis, beyond CUDA's antialias limit of ~94x) is
    area-averaged to 32x first, on every device. Stated tolerance against the direct resize (which
    works on the CPU): at most 2 grey levels, mean below 0.5 (noisy content; smooth content agrees closer)."""
    y = torch.linspace(0, 1, 7000)[:, None]
    x = torch.linspace(0, 1, 90)[None]
    g = torch.Generator().manual_seed(0)
    chans = [0.5 + 0.4 * torch.sin(9 * y + 2 * x), 0.5 + 0.4 * torch.cos(4 * y - 3 * x), 0.3 + 0.6 * y * x]
    img = (
        (torch.stack(chans) * 255 + torch.randn(3, 7000, 90, generator=g) * 20)
        .clamp(0, 255)
        .round()
        .to(torch.uint8)
    )
    crop = img[None].float() / 255
    direct = F.interpolate(crop, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
    pre = rz.resize(crop, 64)
    assert rz._preshrunk(7000, 64) == 32 * 64 and rz._preshrunk(90, 64) == 90
    assert (pre - direct).abs().max() * 255 <= 2.0 and (pre - direct).abs().mean() * 255 < 0.5
    p = center_view_params(90, 7000)
    single = replay_view(img, p, 64)
    assert (single.int() - (direct[0] * 255).round().int()).abs().max() <= 2
    batched = replay_views_batch([img], p[None], 64, batched=True)
    assert (batched.int() - single.int()).abs().max() <= 1
    # below 64x nothing changes: the direct resize, bit for bit
    small = crop[:, :, :4000]
    assert torch.equal(
        rz.resize(small, 64),
        F.interpolate(small, size=(64, 64), mode="bilinear", align_corners=False, antialias=True),
    )


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@CUDA
def test_batched_replay_on_cuda_matches_the_cpu_path():
    """The device path of a GPU run: matmul crop + resize, RandAugment, erasing on CUDA, against the CPU
    per-image path: >= 99.5% of the pixels within 1 grey level (as on the CPU)."""
    pol = ViewPolicy(color_jitter=0.5, rand_augment="rand-m9-mstd0.5-inc1", erase_prob=0.5)
    imgs = _images(40, seed=4, lo=40, hi=400)
    refs = [im for im in imgs for _ in range(3)]
    ps = np.stack(
        [
            sample_view_params(pol, 0, f"k{i // 3}", i % 3, im.shape[2], im.shape[1])
            for i, im in enumerate(refs)
        ]
    )
    cuda = [im.cuda() for im in imgs]
    got = replay_views_batch([im for im in cuda for _ in range(3)], ps, 64).cpu().int()
    want = torch.stack([replay_view(im, p, 64) for im, p in zip(refs, ps, strict=True)]).int()
    assert ((got - want).abs() <= 1).float().mean() >= 0.995


@CUDA
def test_a_downscale_over_100x_works_on_cuda():
    """CUDA's antialiased kernel fails beyond ~94x; the pre-shrink (and the matmul path) do not."""
    img = torch.randint(0, 256, (3, 7200, 7200), dtype=torch.uint8)
    p = center_view_params(7200, 7200)
    want = replay_view(img, p, 64).int()
    single = replay_view(img.cuda(), p, 64).cpu().int()
    batched = replay_views_batch([img.cuda()], p[None], 64).cpu().int()
    assert (single - want).abs().max() <= 1 and (batched - want).abs().max() <= 1
