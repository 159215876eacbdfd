"""int8 tokens are quantized with numpy, block by block, and give the bytes torch's ops gave (issue 26:
the writer threads no longer share torch's thread pool); writer threads run torch with one thread."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from cospress.store.codecs import dequantize, quantize

_QMAX, _F16_MAX = 127.0, float(np.finfo(np.float16).max)


def torch_quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The quantizer stores were written with before (torch, float32, per token)."""
    t = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32)
    scale = (t.abs().amax(dim=-1) / _QMAX).clamp_(max=_F16_MAX).to(torch.float16)
    s = scale.to(torch.float32).unsqueeze(-1)
    q = torch.where(s > 0, t / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(t))
    return q.round_().clamp_(-_QMAX, _QMAX).to(torch.int8).numpy(), scale.numpy()


def tokens(seed: int, shape: tuple[int, ...], dtype) -> np.ndarray:
    """Random tokens whose magnitudes span float16's range, with zero tokens, zeros and ties."""
    g = np.random.default_rng(seed)
    mag = g.choice([1e-7, 1e-3, 1.0, 37.0, 3e3, 6e4], size=(*shape[:-1], 1))
    x = (g.standard_normal(shape) * mag).astype(np.float32)
    x[g.random(shape) < 0.05] = 0.0
    flat = x.reshape(-1, shape[-1])
    flat[::7] = 0.0  # whole zero tokens (skipped rows)
    flat[1::11, 0] = 127.0 * flat[1::11, 1:].__abs__().max(axis=1)  # x / scale lands on .5 ties
    with np.errstate(over="ignore"):
        return x.astype(dtype)  # float16: the largest magnitudes become inf


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("shape", [(3, 2, 5, 16), (2, 3, 257, 24), (1, 1, 1, 8), (7, 384)])
def test_numpy_quantize_gives_torchs_bytes(shape, dtype):
    x = tokens(sum(shape), shape, dtype)
    want_q, want_s = torch_quantize(x)
    for block in (256, 7, 1):
        q, s = quantize(x, block=block)
        assert q.dtype == np.int8 and s.dtype == np.float16
        assert q.shape == x.shape and s.shape == x.shape[:-1]
        assert q.tobytes() == want_q.tobytes()
        assert s.tobytes() == want_s.tobytes()


def test_inf_and_nan_tokens_quantize_as_before():
    x = tokens(5, (4, 3, 6, 16), np.float32)
    x[0, 0, 0, 3] = np.inf
    x[1, 1, 1, 2] = -np.inf
    x[2, 2, 2, 5] = np.nan
    with np.errstate(invalid="ignore", over="ignore"):
        q, s = quantize(x)
    want_q, want_s = torch_quantize(x)
    assert q.tobytes() == want_q.tobytes()
    np.testing.assert_array_equal(s, want_s)  # NaN scale where torch has one (the reader refuses it)


def test_quantize_round_trip_error_is_half_a_step():
    g = np.random.default_rng(9)
    x = (g.standard_normal((5, 2, 9, 32)) * g.choice([0.01, 1.0, 3e3], (5, 2, 9, 1))).astype(np.float32)
    x[0, 0, :2] = 0.0
    q, s = quantize(x)
    back = dequantize(q, s).numpy()
    step = s.astype(np.float32)[..., None]
    assert np.all(back[s == 0] == 0)
    err = np.abs(back - x)[s > 0]
    assert np.all(err <= (step * np.ones_like(x))[s > 0] * 0.5 * (1 + 1e-3))


def test_writer_threads_run_torch_with_one_thread(tmp_path):
    """A writer thread's torch ops use one thread; the main thread keeps its pool, and a thread started
    after the sink is left gets the main thread's count again (torch keeps the last count set as the
    default of new threads)."""
    from cospress.extract.writer import ShardSink
    from tests.test_parallel_writer import data, open_writer

    before = torch.get_num_threads()
    seen = []

    class Probe(ShardSink):
        def _run(self, proc) -> None:
            super()._run(proc)
            seen.append(torch.get_num_threads())  # after the thread's own set-up

    d = data(6)
    w = open_writer(tmp_path / "s", 6, 3)
    with Probe(w, d["keys"], list(d["labels"]), 2) as sink:
        for s in range(w.num_shards):
            buf = sink.buffer(s)
            buf.cls[:], buf.tokens[:], buf.valid[:] = (
                d["cls"][3 * s : 3 * s + 3],
                d["tokens"][3 * s : 3 * s + 3],
                1,
            )
            sink.filled(s, 3)
    assert seen == [1, 1]
    assert torch.get_num_threads() == before
    later = []
    t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert later == [before]
