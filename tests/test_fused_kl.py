"""The memory-lean and fused (Triton) similarity KL give the plain version's values and gradients."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cospress.fused_kl import triton_available
from cospress.losses import DEFAULT_TEMPERATURES, similarity_kl

REPO = Path(__file__).resolve().parents[1]


def _value_and_grads(impl, t, z, temps):
    t = t.detach().clone().requires_grad_(True)
    z = z.detach().clone().requires_grad_(True)
    loss = similarity_kl(t, z, temps, impl=impl)
    gt, gz = torch.autograd.grad(loss, (t, z))
    return loss.detach(), gt, gz


def _float64_kl(t: torch.Tensor, z: torch.Tensor, temps) -> float:
    """The plain formula in float64 throughout (cosines included), vectorised over sets and temperatures."""
    n = t.shape[1]
    eye = torch.eye(n, dtype=torch.bool)
    taus = torch.tensor(temps, dtype=torch.float64)[None, :, None, None]
    joints = []
    for x in (t.double(), z.double()):
        xn = x / x.norm(dim=-1, keepdim=True)
        logits = ((xn @ xn.transpose(1, 2))[:, None] / taus).masked_fill(eye, float("-inf"))
        lp = torch.log_softmax(logits, dim=-1).masked_fill(eye, 0.0)
        joints.append(torch.logaddexp(lp, lp.transpose(-1, -2)) - math.log(2 * n))
    lp, lq = joints
    kl = (lp.exp() * (lp - lq)).masked_fill(eye, 0.0)
    return float(kl.sum(dim=(-1, -2)).mean())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize(
    "b,n,dt,ds,temps",
    [
        (2, 2, 6, 4, (0.1,)),
        (3, 5, 8, 8, DEFAULT_TEMPERATURES),
        (2, 17, 16, 6, (0.01, 0.3)),
        (2, 65, 32, 12, DEFAULT_TEMPERATURES),
    ],
)
def test_lean_equals_plain(b, n, dt, ds, temps):
    t, z = torch.randn(b, n, dt), torch.randn(b, n, ds)
    want = _value_and_grads("plain", t, z, temps)
    got = _value_and_grads("lean", t, z, temps)
    assert _rel(got[0], want[0]) < 1e-4
    for g, w in zip(got[1:], want[1:], strict=True):
        assert _rel(g, w) < 1e-4 or float(w.abs().max()) < 1e-7  # N = 2: KL and gradients are 0


def test_lean_teacher_without_grad_and_saved_memory():
    t, z = torch.randn(4, 33, 16), torch.randn(4, 33, 8, requires_grad=True)
    (gz_plain,) = torch.autograd.grad(similarity_kl(t, z, DEFAULT_TEMPERATURES, impl="plain"), (z,))
    (gz_lean,) = torch.autograd.grad(similarity_kl(t, z, DEFAULT_TEMPERATURES, impl="lean"), (z,))
    assert _rel(gz_lean, gz_plain) < 1e-4

    def saved_bytes(impl):
        total = [0]

        def pack(x):
            total[0] += x.numel() * x.element_size()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            similarity_kl(t, z, DEFAULT_TEMPERATURES, impl=impl)
        return total[0]

    plain, lean = saved_bytes("plain"), saved_bytes("lean")
    one_matrix = 4 * 33 * 33 * 4
    assert lean <= 4 * one_matrix  # S_t, S_z and the small normalisation inputs
    assert plain > 10 * lean


_INTERPRETED = r"""
import json, torch
from cospress.losses import similarity_kl
torch.manual_seed(0)
out = []
for b, n, dt, ds, temps in [(2, 2, 6, 4, (0.1,)), (2, 5, 8, 8, (0.01, 0.05, 0.1)), (1, 40, 16, 6, (0.01,)),
                            (2, 70, 12, 12, (0.02, 0.07, 0.5))]:
    t, z = torch.randn(b, n, dt), torch.randn(b, n, ds)
    res = {}
    for impl in ("plain", "fused"):
        tt, zz = t.clone().requires_grad_(True), z.clone().requires_grad_(True)
        loss = similarity_kl(tt, zz, temps, impl=impl)
        res[impl] = [loss.detach()] + list(torch.autograd.grad(loss, (tt, zz)))
    rel = [float((a - w).abs().max() / w.abs().max().clamp_min(1e-12)) for a, w in zip(res["fused"], res["plain"])]
    scale = [float(w.abs().max()) for w in res["plain"]]
    out.append({"n": n, "rel": rel, "scale": scale})
z = torch.randn(1, 9, 5, requires_grad=True)
t = torch.randn(1, 9, 7)
(g,) = torch.autograd.grad(similarity_kl(t, z, (0.05,), impl="fused"), (z,))
(w,) = torch.autograd.grad(similarity_kl(t, z, (0.05,), impl="plain"), (z,))
out.append({"n": 9, "rel": [float((g - w).abs().max() / w.abs().max())], "scale": [1.0]})
print("RESULT" + json.dumps(out))
"""


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_fused_equals_plain_in_triton_interpreter():
    # TRITON_INTERPRET must be set before triton is imported, so the kernels run in a fresh process.
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _INTERPRETED], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert len(results) == 5
    for r in results:
        for rel, scale in zip(r["rel"], r["scale"], strict=True):
            assert rel < 1e-4 or scale < 1e-7, r


@pytest.mark.skipif(
    not triton_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs triton, not interpreted",
)
def test_fused_refuses_cpu_tensors():
    t = torch.randn(1, 4, 3)
    with pytest.raises(ValueError, match="CUDA"):
        similarity_kl(t, t, impl="fused")


@pytest.mark.skipif(
    not (torch.cuda.is_available() and triton_available()), reason="needs a CUDA GPU and triton"
)
@pytest.mark.parametrize("b,n,dt,ds", [(16, 257, 96, 48), (1, 1024, 64, 32)])
def test_fused_equals_plain_on_cuda(b, n, dt, ds):
    t = torch.randn(b, n, dt, device="cuda")
    z = torch.randn(b, n, ds, device="cuda")
    want = _value_and_grads("plain", t, z, DEFAULT_TEMPERATURES)
    for impl in ("fused", "lean", "auto"):
        got = _value_and_grads(impl, t, z, DEFAULT_TEMPERATURES)
        for g, w in zip(got, want, strict=True):
            assert _rel(g, w) < 1e-4, impl


_INFERENCE_FIRST = r"""
import torch
from cospress.losses import similarity_kl
t, z = torch.randn(2, 6, 5), torch.randn(2, 6, 3)
with torch.inference_mode():
    similarity_kl(t, z, (0.05, 0.1), impl="fused")  # caches the temperature tensor
zz = z.clone().requires_grad_(True)
similarity_kl(t, zz, (0.05, 0.1), impl="fused").backward()
assert zz.grad is not None and torch.isfinite(zz.grad).all()
print("TRAINED")
"""


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_fused_trains_after_a_first_call_under_inference_mode():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _INFERENCE_FIRST],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "TRAINED" in proc.stdout, proc.stderr[-2000:]


def test_lean_trains_after_a_first_call_under_inference_mode():
    t, z = torch.randn(2, 6, 5), torch.randn(2, 6, 3)
    with torch.inference_mode():
        similarity_kl(t, z, (0.05, 0.1), impl="lean")
    zz = z.clone().requires_grad_(True)
    similarity_kl(t, zz, (0.05, 0.1), impl="lean").backward()
    assert zz.grad is not None


@pytest.mark.skipif(
    not (torch.cuda.is_available() and triton_available()), reason="needs a CUDA GPU and triton"
)
@pytest.mark.parametrize("impl", ["plain", "lean", "fused", "auto"])
def test_all_impls_match_float64_on_cuda_with_tf32_requested(impl):
    # With TF32 on, a cosine error of ~1e-3 moves a logit at tau = 0.01 by ~0.1: a reference whose cosines
    # are float64 sees it (feeding one TF32 matrix to both fp32 implementations would not).
    t, z = torch.randn(4, 257, 384, device="cuda"), torch.randn(4, 257, 192, device="cuda")
    want = _float64_kl(t.cpu(), z.cpu(), DEFAULT_TEMPERATURES)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        got = similarity_kl(t, z, DEFAULT_TEMPERATURES, impl=impl)
    finally:
        torch.set_float32_matmul_precision(before)
    assert abs(float(got) - float(want)) <= 1e-4 * abs(float(want)), (float(got), float(want))


def test_float64_helper_matches_plain_on_cpu():
    t, z = torch.randn(2, 9, 6), torch.randn(2, 9, 4)
    got = float(similarity_kl(t, z, (0.02, 0.3), impl="plain"))
    assert abs(got - _float64_kl(t, z, (0.02, 0.3))) <= 1e-5 * abs(got)


@pytest.mark.skipif(
    not (torch.cuda.is_available() and triton_available()), reason="needs a CUDA GPU and triton"
)
def test_fused_self_test_passes_on_cuda():
    from cospress import losses

    losses._FUSED_OK.pop("cuda", None)
    assert losses.fused_works(torch.device("cuda"))
    assert losses._resolve_impl("auto", torch.device("cuda")) == "fused"
