"""Stage 1 decode off the critical path (issue 26): in bytes mode batch k+1 is decoded + replayed in a
thread (on CUDA a side stream) while the teacher runs on batch k; the store is bitwise the one decoded
in turn. Samples pinned by the DataLoader are decoded from their own tensors (no torch.cat: a pageable
copy), and every small host tensor of replay goes up through pinned memory (runtime.to_device)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from cospress.data import device_decode as dd
from cospress.data.policy import ViewPolicy
from cospress.data.sources import open_source
from cospress.data.views import replay_views_batch, sample_view_params
from cospress.extract import teacher as tm
from cospress.runtime import to_device
from tests.test_device_decode import _jpeg, _smooth
from tests.test_stage1_copies import _pageable_copies

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
V2 = ViewPolicy(
    rand_augment="rand-m9-mstd0.5-inc1", erase_prob=0.5, color_jitter=0.8, blur=0.5, grayscale=0.2
)


def _folder(root: Path, n: int = 10) -> str:
    """JPEGs (decoded on the device) and PNGs (decoded in the worker, shipped as pixels)."""
    from PIL import Image

    rng = np.random.default_rng(3)
    for i in range(n):
        h, w = (int(v) for v in rng.integers(24, 60, 2))
        d = root / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        if i % 3:
            (d / f"im{i}.jpg").write_bytes(_jpeg(_smooth(rng, h, w)))
        else:
            Image.fromarray(_smooth(rng, h, w)).save(d / f"im{i}.png")
    return f"folder:{root}"


def _extract(spec: str, out: Path, weights: Path, device: str = "cpu") -> dict:
    from cospress.extract import ExtractConfig, run_extract

    cfg = ExtractConfig(
        data=spec, teacher="test_vit", weights=str(weights), image_size=32, views=2, center_view=True,
        shard_size=4, batch_size=6, workers=0, precision="fp32", device=device, decode="device",
        rand_augment="rand-m9-mstd0.5-inc1", erase_prob=0.5, color_jitter=0.5, row_order="source",
        out=str(out),
    )  # fmt: skip
    return run_extract(cfg)


def _arrays(store: Path) -> dict[str, np.ndarray]:
    import zarr

    group = zarr.open_group(str(store), mode="r")
    return {name: np.asarray(group[name][...]) for name in ("cls", "tokens", "views", "valid", "keys")}


def test_stage1_decodes_ahead_in_a_thread_and_writes_the_same_store(tmp_path, monkeypatch):
    from tests.helpers import make_tiny_teacher_weights

    spec = _folder(tmp_path / "images")
    weights = make_tiny_teacher_weights(tmp_path / "w.safetensors", img_size=32)
    threads = []
    real = tm.decode_view_items

    def decode_view_items(items, size, device):  # the real decode, noting the thread it ran in
        threads.append(threading.current_thread().name)
        return real(items, size, device)

    monkeypatch.setattr(tm, "decode_view_items", decode_view_items)
    _extract(spec, tmp_path / "ahead", weights)
    assert threads and set(threads) == {"cospress-prefetch"}  # not the teacher's thread
    threads.clear()
    monkeypatch.setattr(tm, "AHEAD", 0)
    _extract(spec, tmp_path / "inline", weights)
    assert threads and set(threads) == {threading.main_thread().name}
    ahead, inline = _arrays(tmp_path / "ahead"), _arrays(tmp_path / "inline")
    assert int(ahead["valid"].sum()) == 10
    for name, values in inline.items():
        assert ahead[name].dtype == values.dtype and np.array_equal(ahead[name], values), name


def _samples(spec: str) -> list[dd.Encoded]:
    src = open_source(spec)
    return [dd.read_encoded(src, i) for i in range(len(src))]


def test_a_list_of_samples_decodes_as_its_packed_batch(tmp_path):
    """Stage 1 hands decode_batch per-image samples: decoded from their own tensors, as a packed batch."""
    samples = _samples(_folder(tmp_path / "images"))
    assert {s.kind for s in samples} == {dd.KIND_JPEG, dd.KIND_PIXELS}
    got, errors = dd.decode_batch(samples, "cpu")
    want, want_errors = dd.decode_batch(dd.pack(samples), "cpu")
    assert errors == want_errors
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_to_device_on_the_cpu_is_to():
    t = torch.arange(6, dtype=torch.int32)
    assert torch.equal(to_device(t, torch.device("cpu")), t)
    out = to_device(t, torch.device("cpu"), torch.float64)
    assert out.dtype == torch.float64 and torch.equal(out, t.double())


def _v2_views(n: int = 12) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = np.random.default_rng(0)
    images = [torch.from_numpy(_smooth(g, 40 + i, 50)).permute(2, 0, 1).contiguous() for i in range(n // 3)]
    refs = [images[i // 3] for i in range(n)]
    params = [sample_view_params(V2, 0, f"k{i // 3}", i % 3, 50, 40 + i // 3) for i in range(n)]
    return refs, torch.from_numpy(np.stack(params))


@CUDA
def test_batched_replay_on_cuda_makes_no_pageable_copy():
    """Crop + resize, flip, colour, blur, RandAugment and erasing: every small host tensor goes pinned."""
    refs, params = _v2_views()
    dev = [r.cuda() for r in refs]
    same = {id(r): d for r, d in zip(refs, dev, strict=True)}
    dev = [same[id(r)] for r in refs]  # the views of an image share its tensor
    replay_views_batch(dev, params, 24)  # warm-up (pinned allocator)
    assert _pageable_copies(lambda: replay_views_batch(dev, params, 24)) == []
    want = replay_views_batch(refs, params, 24, batched=True).int()
    got = replay_views_batch(dev, params, 24).cpu().int()
    assert ((got - want).abs() <= 1).float().mean() >= 0.995


@CUDA
def test_pinned_samples_are_decoded_on_cuda_without_a_pageable_copy(tmp_path):
    samples = [s.pin_memory() for s in _samples(_folder(tmp_path / "images"))]
    cuda = torch.device("cuda")
    dd.decode_batch(samples, cuda)
    assert _pageable_copies(lambda: dd.decode_batch(samples, cuda)) == []


@CUDA
def test_stage1_on_cuda_decodes_ahead_on_a_side_stream_and_matches_decoding_in_turn(tmp_path, monkeypatch):
    from tests.helpers import make_tiny_teacher_weights

    spec = _folder(tmp_path / "images")
    weights = make_tiny_teacher_weights(tmp_path / "w.safetensors", img_size=32)
    _extract(spec, tmp_path / "ahead", weights, device="cuda")
    monkeypatch.setattr(tm, "AHEAD", 0)
    _extract(spec, tmp_path / "inline", weights, device="cuda")
    ahead, inline = _arrays(tmp_path / "ahead"), _arrays(tmp_path / "inline")
    for name in ("views", "valid", "keys"):
        assert np.array_equal(ahead[name], inline[name]), name
    for name in ("cls", "tokens"):  # cuBLAS on two streams need not be bitwise: the replay's resize
        np.testing.assert_allclose(ahead[name].astype(np.float32), inline[name].astype(np.float32), atol=0.05)
