"""Tests for cospress.losses against a float64 reference written here from the formula."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cospress import losses
from cospress.errors import ConfigError
from cospress.losses import (
    DEFAULT_TEMPERATURES,
    cospress_loss,
    feature_distill_loss,
    similarity_kl,
)
from cospress.models.features import Features


def reference_kl(t: torch.Tensor, z: torch.Tensor, temperatures) -> torch.Tensor:
    """KL(P || Q) straight from the formula, float64, explicit loops over sets, taus and rows."""
    t, z = t.double(), z.double()
    n_sets, n, _ = t.shape
    total = torch.zeros((), dtype=torch.float64)
    for b in range(n_sets):
        for tau in temperatures:
            joints = []
            for x in (t[b], z[b]):
                xn = x / x.norm(dim=-1, keepdim=True)
                sim = xn @ xn.T
                cond = torch.zeros(n, n, dtype=torch.float64)
                for i in range(n):
                    others = [j for j in range(n) if j != i]
                    e = torch.exp(sim[i, others] / tau - (sim[i, others] / tau).max())
                    cond[i, others] = e / e.sum()
                joints.append((cond + cond.T) / (2 * n))
            p, q = joints
            off = ~torch.eye(n, dtype=torch.bool)
            total = total + (p[off] * torch.log(p[off] / q[off])).sum() / len(temperatures)
    return total / n_sets


CASES = [
    (2, 8, 5, (0.05, 0.1)),
    (5, 12, 7, DEFAULT_TEMPERATURES),
    (17, 6, 16, (0.01, 0.5)),
    (64, 24, 10, (0.03, 0.07, 1.0)),
]


@pytest.mark.parametrize("n,dt,ds,temps", CASES)
def test_matches_float64_reference(n, dt, ds, temps):
    t, z = torch.randn(2, n, dt), torch.randn(2, n, ds)
    got = similarity_kl(t, z, temps, impl="plain")
    want = reference_kl(t, z, temps)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6), (float(got), float(want))


@pytest.mark.parametrize("n", [2, 5, 17])
def test_gradients_match_float64_reference(n):
    temps = (0.02, 0.1)
    t = torch.randn(2, n, 9, dtype=torch.float64, requires_grad=True)
    z = torch.randn(2, n, 6, dtype=torch.float64, requires_grad=True)
    want = torch.autograd.grad(reference_kl(t, z, temps), (t, z))
    got = torch.autograd.grad(similarity_kl(t, z, temps, impl="plain"), (t, z))
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float64  # gradients come back in the input dtype
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-6 * max(1.0, float(w.abs().max())))


@pytest.mark.parametrize("n", [257, 1024])
def test_finite_at_small_temperature_and_large_sets(n):
    # Near-duplicates, an exact duplicate and a zero vector push the cosines to their extremes.
    base = torch.randn(1, n, 16)
    t = base + 1e-3 * torch.randn(1, n, 16)
    t[0, 1] = t[0, 0]
    t[0, 2] = 0.0
    t.requires_grad_(True)
    z = torch.randn(1, n, 8, requires_grad=True)
    for impl in ("plain", "lean"):
        loss = similarity_kl(t, z, (0.01,), impl=impl)
        gt, gz = torch.autograd.grad(loss, (t, z))
        assert torch.isfinite(loss) and loss > 0
        assert torch.isfinite(gt).all() and torch.isfinite(gz).all()
        assert gz.abs().sum() > 0


def test_zero_for_identity_and_positive_otherwise():
    t = torch.randn(3, 33, 16)
    identity = nn.Linear(16, 16, bias=False)
    nn.init.eye_(identity.weight)
    with torch.no_grad():
        z = identity(t)
    for impl in ("plain", "lean"):
        assert abs(float(similarity_kl(t, z, DEFAULT_TEMPERATURES, impl=impl))) < 1e-6
        assert abs(float(similarity_kl(t, 3.0 * t, DEFAULT_TEMPERATURES, impl=impl))) < 1e-6  # scale-free
        assert float(similarity_kl(t, t + 0.3 * torch.randn_like(t), DEFAULT_TEMPERATURES, impl=impl)) > 1e-4


def test_float32_whatever_the_input_dtype():
    t, z = torch.randn(2, 9, 8), torch.randn(2, 9, 4)
    want = similarity_kl(t.bfloat16().float(), z.bfloat16().float(), (0.05,), impl="plain")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = similarity_kl(t.bfloat16(), z.bfloat16(), (0.05,), impl="plain")
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=1e-6)


def test_input_errors_and_impl_choice():
    t = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="at least 2"):
        similarity_kl(t[:, :1], t[:, :1])
    with pytest.raises(ValueError, match=r"\(2, 5, 4\)"):
        similarity_kl(t, torch.randn(2, 6, 4))
    with pytest.raises(ConfigError, match="temperatures"):
        similarity_kl(t, t, (0.1, 0.0))
    with pytest.raises(ConfigError, match="temperatures"):
        similarity_kl(t, t, ())
    with pytest.raises(ValueError, match="impl"):
        similarity_kl(t, t, impl="fast")
    assert losses._resolve_impl("auto", torch.device("cpu")) == "plain"
    assert losses._resolve_impl(None, torch.device("cpu")) == "plain"
    assert DEFAULT_TEMPERATURES == (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1)


# ------------------------------------------------------------------------------------------ cospress


class _Setup:
    """Teacher features -> compressor h (LayerNorm + Linear); student features are leaf tensors."""

    def __init__(self, b=6, t=4, dt=12, ds=8):
        self.teacher = Features(
            torch.randn(b, dt, requires_grad=True), torch.randn(b, t, dt, requires_grad=True)
        )
        self.h = nn.Sequential(nn.LayerNorm(dt), nn.Linear(dt, ds))
        self.compressed = Features(self.h(self.teacher.cls), self.h(self.teacher.tokens))
        self.student = Features(
            torch.randn(b, ds, requires_grad=True), torch.randn(b, t, ds, requires_grad=True)
        )

    def grads(self, loss, wrt):
        g = torch.autograd.grad(loss, wrt, retain_graph=True, allow_unused=True)
        return [torch.zeros(()) if x is None else x for x in g]


def test_cospress_stop_gradient_structure():
    s = _Setup()
    out = cospress_loss(s.teacher, s.compressed, s.student, (0.05, 0.1))
    assert set(out) == {"local", "global", "tokens", "cls", "total"}
    h_params = list(s.h.parameters())
    student = [s.student.cls, s.student.tokens]
    for name in ("tokens", "cls"):
        assert all(float(g.abs().sum()) == 0 for g in s.grads(out[name], h_params)), name
        assert sum(float(g.abs().sum()) for g in s.grads(out[name], student)) > 0, name
    for name in ("local", "global"):
        assert all(float(g.abs().sum()) == 0 for g in s.grads(out[name], student)), name
        assert sum(float(g.abs().sum()) for g in s.grads(out[name], h_params)) > 0, name
    # The teacher side is not assumed constant: the similarity terms reach it.
    assert float(s.grads(out["local"], [s.teacher.tokens])[0].abs().sum()) > 0


def test_cospress_values_weights_and_global_batch():
    s = _Setup()
    temps = (0.05,)
    out = cospress_loss(s.teacher, s.compressed, s.student, temps)
    sa, ca = s.student.all_tokens().flatten(1), s.compressed.all_tokens().flatten(1)
    want_tokens = (1 - torch.cosine_similarity(sa, ca, dim=-1)).mean()
    want_cls = (1 - torch.cosine_similarity(s.student.cls, s.compressed.cls, dim=-1)).mean()
    assert torch.allclose(out["tokens"], want_tokens, atol=1e-6)
    assert torch.allclose(out["cls"], want_cls, atol=1e-6)
    assert torch.allclose(
        out["local"], similarity_kl(s.teacher.all_tokens(), s.compressed.all_tokens(), temps)
    )
    assert torch.allclose(out["global"], similarity_kl(s.teacher.cls[None], s.compressed.cls[None], temps))
    assert torch.allclose(out["total"], out["local"] + out["global"] + out["tokens"] + out["cls"])

    weighted = cospress_loss(s.teacher, s.compressed, s.student, temps, weights={"global": 0.0, "cls": 2.0})
    assert torch.allclose(weighted["total"], out["local"] + out["tokens"] + 2 * out["cls"])
    with pytest.raises(ValueError, match="unknown loss weight"):
        cospress_loss(s.teacher, s.compressed, s.student, temps, weights={"kl": 1.0})

    gt, gz = torch.randn(20, 12), torch.randn(20, 8)
    gout = cospress_loss(
        s.teacher, s.compressed, s.student, temps, global_teacher_cls=gt, global_compressed_cls=gz
    )
    assert torch.allclose(gout["global"], reference_kl(gt[None], gz[None], temps).float(), rtol=1e-5)
    assert not torch.allclose(gout["global"], out["global"])
    with pytest.raises(ValueError, match="both"):
        cospress_loss(s.teacher, s.compressed, s.student, temps, global_teacher_cls=gt)


def test_cospress_without_tokens_and_shape_errors():
    s = _Setup()
    out = cospress_loss(s.teacher, s.compressed, s.student, (0.1,), use_tokens=False)
    assert out["local"].item() == 0.0 and out["tokens"].item() == 0.0
    assert out["global"].item() > 0 and out["cls"].item() > 0
    assert torch.allclose(out["total"], out["global"] + out["cls"])
    bad = Features(s.student.cls, torch.randn(6, 9, 8))
    with pytest.raises(ValueError, match=r"\(6, 10, 8\).*\(6, 5, 8\)"):
        cospress_loss(s.teacher, s.compressed, bad, (0.1,))


def test_mismatched_grids_local_term_on_native_tokens_target_pooled():
    # teacher 4x4 tokens, student 2x2: the local term is the teacher-vs-h(t) KL on all 1 + 16 native
    # tokens (exactly the value with no student at all); only the token-cosine target is pooled
    s = _Setup(t=16)
    student = Features(s.student.cls, torch.randn(6, 4, 8, requires_grad=True))
    temps = (0.05, 0.1)
    out = cospress_loss(s.teacher, s.compressed, student, temps, grids=((4, 4), (2, 2)))
    native = similarity_kl(s.teacher.all_tokens(), s.compressed.all_tokens(), temps)
    assert torch.equal(out["local"], native)
    pooled = s.compressed.tokens.view(6, 2, 2, 2, 2, 8).mean(dim=(2, 4)).reshape(6, 4, 8)
    target = torch.cat([s.compressed.cls[:, None], pooled], dim=1).flatten(1)
    want = (1 - torch.cosine_similarity(student.all_tokens().flatten(1), target, dim=-1)).mean()
    assert torch.allclose(out["tokens"], want, atol=1e-6)
    assert float(s.grads(out["tokens"], list(s.h.parameters()))[0].abs().sum()) == 0  # target detached
    # the baselines: the teacher's tokens are the target, pooled to the prediction's grid
    pred = Features(torch.randn(6, 12), torch.randn(6, 4, 12))
    base = feature_distill_loss("mse", pred, s.teacher, grids=((4, 4), (2, 2)))
    t_pooled = s.teacher.tokens.view(6, 2, 2, 2, 2, 12).mean(dim=(2, 4)).reshape(6, 4, 12)
    want_t = torch.nn.functional.mse_loss(pred.all_tokens(), torch.cat([s.teacher.cls[:, None], t_pooled], 1))
    assert torch.allclose(base["tokens"], want_t)
    with pytest.raises(ValueError, match="differ"):
        cospress_loss(s.teacher, s.compressed, student, temps)  # no grids: 16 vs 4 tokens


# ------------------------------------------------------------------------------------------ baselines


def test_feature_distill_losses():
    pred = Features(torch.randn(4, 6, requires_grad=True), torch.randn(4, 3, 6))
    target = Features(torch.randn(4, 6), torch.randn(4, 3, 6))
    for kind in ("cosine", "mse", "smooth-l1"):
        same = feature_distill_loss(kind, target, target)
        assert set(same) == {"cls", "tokens", "total"}
        assert same["total"].item() < 1e-6, kind
        out = feature_distill_loss(kind, pred, target)
        assert out["cls"].item() > 0 and out["tokens"].item() > 0
        assert torch.allclose(out["total"], out["cls"] + out["tokens"])
        assert pred.cls.grad is None
        out["total"].backward()
        assert pred.cls.grad is not None and float(pred.cls.grad.abs().sum()) > 0
        pred.cls.grad = None
    mse = feature_distill_loss("mse", pred, target)
    diff = (pred.all_tokens() - target.all_tokens()).pow(2).mean()
    assert torch.allclose(mse["tokens"], diff)
    cos = feature_distill_loss("cosine", pred, target)
    want = 1 - torch.cosine_similarity(pred.all_tokens().flatten(1), target.all_tokens().flatten(1)).mean()
    assert math.isclose(cos["tokens"].item(), want.item(), rel_tol=1e-5)
    no_tok = feature_distill_loss("smooth-l1", pred, target, use_tokens=False)
    assert no_tok["tokens"].item() == 0.0 and torch.allclose(no_tok["total"], no_tok["cls"])
    with pytest.raises(ValueError, match="unknown feature distillation"):
        feature_distill_loss("l2", pred, target)
    with pytest.raises(ValueError, match="head"):
        feature_distill_loss("mse", Features(torch.randn(4, 5), torch.randn(4, 3, 5)), target)


# ------------------------------------------------------------------------------------------ precision


class _MatmulPrecisions(torch.overrides.TorchFunctionMode):
    """Records the cuBLAS / oneDNN float32 matmul precision in force at each matmul."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("matmul", "__matmul__", "bmm"):
            self.seen.append(
                (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)
            )
        return func(*args, **(kwargs or {}))


@pytest.fixture
def tf32_requested():
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("impl", ["plain", "lean"])
def test_cosines_in_full_fp32_despite_high_matmul_precision(tf32_requested, impl):
    t, z = torch.randn(2, 12, 7), torch.randn(2, 12, 5)
    with _MatmulPrecisions() as seen:
        got = similarity_kl(t, z, (0.01, 0.1), impl=impl)
    assert seen.seen and all(p == ("ieee", "ieee") for p in seen.seen), seen.seen
    assert torch.get_float32_matmul_precision() == "high"  # restored after
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    want = reference_kl(t, z, (0.01, 0.1))
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6), (float(got), float(want))


# ------------------------------------------------------------------------------------------ auto impl


def test_auto_falls_back_to_lean_when_the_fused_self_test_fails(monkeypatch, caplog):
    calls = []

    def broken_fused(t, z, temperatures):
        calls.append(1)
        raise RuntimeError("triton JIT failed: no libcuda.so\nsecond line")

    monkeypatch.setattr(losses, "similarity_kl_fused", broken_fused)
    monkeypatch.setattr(losses, "triton_available", lambda: True)
    monkeypatch.setattr(losses, "_FUSED_OK", {})
    with caplog.at_level("WARNING", logger="cospress.losses"):
        assert losses._resolve_impl("auto", torch.device("cuda")) == "lean"
        assert losses._resolve_impl(None, torch.device("cuda")) == "lean"  # cached: one test, one warning
    assert len(calls) <= 1
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "impl='lean'" in warnings[0] and "second line" not in warnings[0]
    assert losses._resolve_impl("auto", torch.device("cpu")) == "plain"
    assert losses._resolve_impl("fused", torch.device("cuda")) == "fused"  # explicit choice untouched


def test_fused_self_test_checks_value_and_gradient(monkeypatch):
    monkeypatch.setattr(losses, "_FUSED_OK", {})
    monkeypatch.setattr(losses, "similarity_kl_fused", losses.similarity_kl_lean)
    assert losses.fused_works(torch.device("cpu"))
    monkeypatch.setattr(losses, "_FUSED_OK", {})
    monkeypatch.setattr(
        losses, "similarity_kl_fused", lambda t, z, temps: 1.01 * similarity_kl(t, z, temps, "lean")
    )
    assert not losses.fused_works(torch.device("cpu"))
