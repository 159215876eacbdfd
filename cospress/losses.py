"""CosPress losses (similarity-preserving KL + cosine distillation) and feature-distillation baselines.

All functions are pure: tensors in, a scalar or a dict of named scalar terms out.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from cospress.fused_kl import similarity_kl_fused, similarity_kl_lean, triton_available
from cospress.models.features import Features, resample_tokens
from cospress.similarity import check_similarity_inputs, cosine_matrix

log = logging.getLogger(__name__)

DEFAULT_TEMPERATURES: tuple[float, ...] = tuple(round(0.01 * k, 2) for k in range(1, 11))

# "auto" (also impl=None) picks "fused" for CUDA tensors when triton is importable and the fused
# kernels pass a one-time self-test on that device, "lean" on CUDA otherwise, else "plain".
IMPLS = ("auto", "plain", "fused", "lean")

COSPRESS_TERMS = ("local", "global", "tokens", "cls")


def _resolve_impl(impl: str | None, device: torch.device) -> str:
    impl = "auto" if impl is None else impl
    if impl not in IMPLS:
        raise ValueError(f"unknown similarity_kl impl {impl!r}; choose one of {IMPLS}")
    if impl == "auto":
        if device.type != "cuda":
            return "plain"
        return "fused" if triton_available() and fused_works(device) else "lean"
    return impl


_FUSED_OK: dict[str, bool] = {}


def fused_works(device: torch.device) -> bool:
    """Whether the fused kernels compile and match the plain loss (value and gradient) on `device`.

    Run once per device (a small set, two temperatures); on failure logs one warning line and
    `impl="auto"` falls back to the lean implementation.
    """
    key = str(device)
    if key not in _FUSED_OK:
        try:
            _fused_self_test(device)
            _FUSED_OK[key] = True
        except Exception as exc:  # any JIT / driver / numeric failure means "do not use it"
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            log.warning(
                "fused similarity KL unusable on %s (%s: %s); using impl='lean'",
                key,
                type(exc).__name__,
                first,
            )
            _FUSED_OK[key] = False
    return _FUSED_OK[key]


def _fused_self_test(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(0)
    t0, z0 = torch.randn(2, 37, 16, generator=gen), torch.randn(2, 37, 8, generator=gen)
    temps = (0.01, 0.1)
    with torch.inference_mode(False), torch.enable_grad():
        results = []
        for fn in (similarity_kl_fused, _similarity_kl_plain):
            z = z0.to(device).requires_grad_(True)
            loss = fn(t0.to(device), z, temps)
            (grad,) = torch.autograd.grad(loss, (z,))
            results.append((loss.detach().cpu(), grad.cpu()))
    for got, want in zip(*results, strict=True):
        err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
        if not err < 1e-3:
            raise RuntimeError(f"self-test mismatch against the plain loss: relative error {err:.2e}")


def _log_joint(x: torch.Tensor, taus: torch.Tensor, eye: torch.Tensor) -> torch.Tensor:
    """log P [B, T, N, N] of one side (see `similarity_kl`), diagonal 0."""
    logits = cosine_matrix(x)[:, None] / taus[None, :, None, None]  # [B, T, N, N]
    # The diagonal is excluded with -inf (exp -> exactly 0), then replaced by a finite 0 so that
    # logaddexp and its gradient never see -inf - (-inf); torch.where passes no gradient there.
    logp = torch.log_softmax(logits.masked_fill(eye, float("-inf")), dim=-1)
    logp = torch.where(eye, torch.zeros((), device=x.device), logp)
    return torch.logaddexp(logp, logp.transpose(-1, -2)) - math.log(2 * x.shape[1])


def _kl_of_joints(log_p: torch.Tensor, log_q: torch.Tensor, eye: torch.Tensor) -> torch.Tensor:
    kl = torch.where(eye, torch.zeros((), device=log_p.device), log_p.exp() * (log_p - log_q))
    return kl.sum(dim=(-1, -2)).mean()


def _similarity_kl_plain(t: torch.Tensor, z: torch.Tensor, temperatures: Sequence[float]) -> torch.Tensor:
    """Reference implementation with autograd; holds several [B, T, N, N] float32 tensors."""
    return _plain_kls([t, z], [(0, 1)], temperatures)[0]


def _plain_kls(
    sets: Sequence[torch.Tensor], pairs: Sequence[tuple[int, int]], temperatures: Sequence[float]
) -> list[torch.Tensor]:
    """KL(P_i || P_j) of each pair of ``sets``, each set's log P computed once (inputs checked and cast
    by the caller)."""
    first = sets[0]
    taus = torch.tensor([float(x) for x in temperatures], dtype=torch.float32, device=first.device)
    eye = torch.eye(first.shape[1], dtype=torch.bool, device=first.device)
    joints = {k: _log_joint(sets[k], taus, eye) for k in sorted({k for pair in pairs for k in pair})}
    return [_kl_of_joints(joints[i], joints[j], eye) for i, j in pairs]


def similarity_kls(
    sets: Sequence[torch.Tensor], pairs: Sequence[tuple[int, int]], temperatures: Sequence[float]
) -> list[torch.Tensor]:
    """`similarity_kl` (the plain implementation) of each pair ``(i, j)`` of ``sets`` (t = sets[i],
    z = sets[j]), each set's log P computed once: what several measures of the same sets cost (a
    store commit's codec fidelity: three pairs of three sets, half the work of three calls)."""
    for i, j in pairs:
        check_similarity_inputs(sets[i], sets[j], temperatures)
    with torch.autocast(device_type=sets[0].device.type, enabled=False):
        return _plain_kls([x.float() for x in sets], pairs, temperatures)


def similarity_kl(
    t: torch.Tensor,
    z: torch.Tensor,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    impl: str | None = None,
) -> torch.Tensor:
    """Similarity-preservation KL between the cosine geometry of t and of z.

    t: [B, N, Dt] (teacher side), z: [B, N, Ds] (compressed side): B independent sets of N vectors.
    For each set and temperature tau, with i != j:
        log p_{j|i} = log_softmax_{j != i}(cos(t_i, t_j) / tau),
        log P_ij = logaddexp(log p_{j|i}, log p_{i|j}) - log 2N,   Q likewise from z,
        KL(P || Q) = sum_{i != j} P_ij (log P_ij - log Q_ij).
    Returns a scalar: the mean over the B sets of the mean over the temperatures. Computed in
    float32 and log space whatever the input dtype or autocast state; both sides get gradients.

    impl: "plain" (autograd, stores [B, T, N, N] tensors), "lean" (pure PyTorch, stores only the two
    [B, N, N] cosine matrices), "fused" (Triton kernels), "auto" (on CUDA: fused when triton imports and
    passes a one-time self-test, see :func:`fused_works`, else lean; plain elsewhere); None = auto.
    """
    check_similarity_inputs(t, z, temperatures)
    which = _resolve_impl(impl, t.device)
    if which == "fused":
        return similarity_kl_fused(t, z, temperatures)
    if which == "lean":
        return similarity_kl_lean(t, z, temperatures)
    with torch.autocast(device_type=t.device.type, enabled=False):
        return _similarity_kl_plain(t.float(), z.float(), temperatures)


def _one_minus_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over rows of 1 - cos(a_r, b_r), in float32: a, b [B, D] -> scalar."""
    with torch.autocast(device_type=a.device.type, enabled=False):
        return (1.0 - F.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8)).mean()


def _check_weights(weights: Mapping[str, float] | None, names: Sequence[str]) -> dict[str, float]:
    out = dict.fromkeys(names, 1.0)
    for key, value in (weights or {}).items():
        if key not in out:
            raise ValueError(f"unknown loss weight {key!r}; known terms are {list(names)}")
        out[key] = float(value)
    return out


Grids = tuple[tuple[int, int], tuple[int, int]]


def on_grid(features: Features, grids: Grids | None) -> Features:
    """``features`` with its tokens moved from ``grids[0]`` (the teacher's) to ``grids[1]`` (the student's).

    Area pooling down, bilinear up (:func:`~cospress.models.features.resample_tokens`); the same
    object when ``grids`` is None, the grids are equal or there are no tokens.
    """
    if grids is None or tuple(grids[0]) == tuple(grids[1]) or features.tokens.shape[1] == 0:
        return features
    return Features(features.cls, resample_tokens(features.tokens, tuple(grids[0]), tuple(grids[1])))


def cospress_loss(
    teacher: Features,
    compressed: Features,
    student: Features,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    global_teacher_cls: torch.Tensor | None = None,
    global_compressed_cls: torch.Tensor | None = None,
    use_tokens: bool = True,
    weights: Mapping[str, float] | None = None,
    impl: str | None = None,
    grids: Grids | None = None,
) -> dict[str, torch.Tensor]:
    """The CosPress objective as named terms: {"local", "global", "tokens", "cls", "total"}.

    teacher: cls [B, Dt], tokens [B, T, Dt]; compressed = h(teacher): cls [B, Ds], tokens [B, T, Ds];
    student: cls [B, Ds], tokens [B, S, Ds]. T = S unless ``grids`` = (teacher grid, student grid)
    says how the two token maps are laid out.
    - local: similarity_kl over each image's CLS + patch tokens [B, 1 + T, .], teacher vs compressed,
      on the teacher's native grid (the student plays no part in it, so nothing is resampled).
    - global: similarity_kl over the CLS vectors of the batch as one set; global_teacher_cls [G, Dt]
      and global_compressed_cls [G, Ds] (e.g. the all-gathered batch under DDP) replace the local
      batch when given (both or neither).
    - tokens: mean over images of 1 - cos(flatten(student all tokens), flatten(sg(compressed all tokens)));
      with ``grids``, the compressed tokens are first moved to the student's grid (:func:`on_grid`:
      area pooling down, bilinear up): only this target is resampled.
    - cls: mean over images of 1 - cos(student CLS, sg(compressed CLS)).
    The compressor learns only from local + global, the student only from tokens + cls (stop-gradient
    on the compressed side of the cosines). With use_tokens=False (a store without tokens) the
    "local" and "tokens" terms are returned as zeros and only CLS vectors are used.
    weights: per-term multipliers for "total" (default 1 each). All terms are float32 scalars.
    """
    w = _check_weights(weights, COSPRESS_TERMS)
    if (global_teacher_cls is None) != (global_compressed_cls is None):
        raise ValueError("pass both global_teacher_cls and global_compressed_cls, or neither")
    gt = teacher.cls if global_teacher_cls is None else global_teacher_cls
    gz = compressed.cls if global_compressed_cls is None else global_compressed_cls
    zero = torch.zeros((), dtype=torch.float32, device=teacher.cls.device)

    terms: dict[str, torch.Tensor] = {"global": similarity_kl(gt[None], gz[None], temperatures, impl=impl)}
    if use_tokens:
        terms["local"] = similarity_kl(teacher.all_tokens(), compressed.all_tokens(), temperatures, impl=impl)
        s_all, c_all = student.all_tokens(), on_grid(compressed, grids).all_tokens()
        if s_all.shape != c_all.shape:
            raise ValueError(
                f"student and compressed token maps differ: student {tuple(s_all.shape)} vs compressed "
                f"{tuple(c_all.shape)} (CLS + tokens); match the student's token grid and dim to the store's"
            )
        terms["tokens"] = _one_minus_cos(s_all.flatten(1), c_all.detach().flatten(1))
    else:
        terms["local"] = zero
        terms["tokens"] = zero
    if student.cls.shape != compressed.cls.shape:
        raise ValueError(
            f"student and compressed CLS differ: student {tuple(student.cls.shape)} vs compressed "
            f"{tuple(compressed.cls.shape)}"
        )
    terms["cls"] = _one_minus_cos(student.cls, compressed.cls.detach())
    out = {name: terms[name] for name in COSPRESS_TERMS}
    out["total"] = sum(w[name] * out[name] for name in COSPRESS_TERMS)
    return out


FEATURE_DISTILL_KINDS = ("cosine", "mse", "smooth-l1")


def feature_distill_loss(
    kind: str,
    pred: Features,
    target: Features,
    use_tokens: bool = True,
    weights: Mapping[str, float] | None = None,
    grids: Grids | None = None,
) -> dict[str, torch.Tensor]:
    """Baseline feature distillation: {"cls", "tokens", "total"}.

    pred: cls [B, D], tokens [B, S, D] (e.g. student + head into the teacher space); target: cls [B, D],
    tokens [B, T, D] (the teacher; treated as a constant, detached), T = S unless ``grids`` = (target
    grid, pred grid): then the target tokens are moved to the pred's grid (:func:`on_grid`). The
    tokens term uses the whole map, CLS + patches [B, 1 + S, D].
    - cosine: cls = mean of 1 - cos(pred CLS, target CLS); tokens = mean over images of
      1 - cos(flatten(pred map), flatten(target map)).
    - mse / smooth-l1: mean over all elements of the CLS vectors, and of the token maps.
    With use_tokens=False the "tokens" term is zero. weights: per-term multipliers (default 1).
    """
    if kind not in FEATURE_DISTILL_KINDS:
        raise ValueError(f"unknown feature distillation loss {kind!r}; choose one of {FEATURE_DISTILL_KINDS}")
    w = _check_weights(weights, ("cls", "tokens"))
    pairs = {"cls": (pred.cls, target.cls.detach())}
    if use_tokens:
        pairs["tokens"] = (pred.all_tokens(), on_grid(target, grids).all_tokens().detach())
    out: dict[str, torch.Tensor] = {}
    for name, (p, t) in pairs.items():
        if p.shape != t.shape:
            raise ValueError(
                f"{name}: prediction {tuple(p.shape)} and target {tuple(t.shape)} differ; "
                "give the student a head that maps to the teacher's dimension"
            )
        with torch.autocast(device_type=p.device.type, enabled=False):
            p, t = p.float(), t.float()
            if kind == "cosine":
                out[name] = _one_minus_cos(p.flatten(1), t.flatten(1))
            elif kind == "mse":
                out[name] = F.mse_loss(p, t)
            else:
                out[name] = F.smooth_l1_loss(p, t)
    if not use_tokens:
        out["tokens"] = torch.zeros((), dtype=torch.float32, device=pred.cls.device)
    out = {"cls": out["cls"], "tokens": out["tokens"]}
    out["total"] = w["cls"] * out["cls"] + w["tokens"] * out["tokens"]
    return out
