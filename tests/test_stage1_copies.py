"""Stage 1's host-to-device copies (issue 26): RandAugment's affine grid is built on the device and
its small index / value tensors go through pinned memory; a batch of pinned views is concatenated
into pinned memory. On a CPU the results are the old ones, bit for bit; on CUDA no pageable copy is
made (a pageable copy blocks the stream)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cospress.data.policy import ViewPolicy
from cospress.data.randaugment import RA_SLOTS, apply_rand_augment, to_device
from cospress.data.views import sample_view_params
from cospress.extract.teacher import _batch

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _ops(n: int) -> torch.Tensor:
    """RandAugment slots of ``n`` views with geometric and pointwise ops (the params' tail)."""
    pol = ViewPolicy(rand_augment="rand-m9-mstd0.5-inc1")
    ps = np.stack([sample_view_params(pol, 0, f"k{i}", 0, 64, 64) for i in range(n)])
    names = pol.param_names
    first = next(i for i, name in enumerate(names) if name.startswith("ra"))
    return torch.from_numpy(ps[:, first : first + 2 * RA_SLOTS]).to(torch.float32)


def test_cpu_results_unchanged():
    x = torch.rand(12, 3, 32, 32)
    ops = _ops(12)
    assert torch.equal(apply_rand_augment(x, ops), apply_rand_augment(x.clone(), ops.clone()))
    t = torch.arange(5)
    assert to_device(t, torch.device("cpu")) is t or torch.equal(to_device(t, torch.device("cpu")), t)
    views = [torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8) for _ in range(3)]
    assert torch.equal(_batch(views, torch.device("cpu")), torch.cat(views))


def _pageable_copies(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if "HtoD" in e.name and "Pageable" in e.name]


@CUDA
def test_rand_augment_on_cuda_makes_no_pageable_copy_and_matches_the_cpu():
    x = torch.rand(16, 3, 48, 48)
    ops = _ops(16)
    want = apply_rand_augment(x, ops)
    xc = x.cuda()
    apply_rand_augment(xc, ops)  # warm-up (the pinned allocator's first blocks)
    assert _pageable_copies(lambda: apply_rand_augment(xc, ops)) == []
    got = apply_rand_augment(xc, ops).cpu()
    assert ((got - want).abs() <= 1 / 255 + 1e-6).float().mean() >= 0.995


@CUDA
def test_a_batch_of_pinned_views_is_copied_without_a_pageable_copy():
    views = [torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8).pin_memory() for _ in range(4)]
    dev = torch.device("cuda")
    _batch(views, dev)
    assert _pageable_copies(lambda: _batch(views, dev)) == []
    assert torch.equal(_batch(views, dev).cpu(), torch.cat(views))
