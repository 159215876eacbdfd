"""Token codecs: how a store keeps its patch tokens (CLS stays float16 in every codec).

- ``fp16``: float16 tokens ``[N, V, T, Dt]`` (the default, and what stores before schema 2.0 hold).
- ``int8``: symmetric per-token quantisation: int8 ``tokens [N, V, T, Dt]`` and a float16 scale per
  token ``token_scale [N, V, T]``; a token decodes as ``q * scale``.
- ``pca``: the tokens projected onto the top ``k`` principal directions of a sample of the data
  (fitted before the first shard is written, kept in the store as ``token_projection/``), then
  int8 as above: ``tokens [N, V, T, k]`` int8 + ``token_scale``; a token decodes as
  ``mean + (q * scale) @ basis``. Every rank and every later append uses the stored projection.

The codec (and the projection's hash) is part of the store identity (``token_codec``); readers
decode transparently, so stage 2 sees float16 tokens whatever the codec.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from cospress.errors import ConfigError, StoreError

CODEC_NAMES = ("fp16", "int8", "pca")
_QMAX = 127.0
_F16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class CodecSpec:
    """What ``--token-codec`` asks for: ``name`` and, for ``pca``, ``components`` (None: the fewest
    that reach the fidelity target)."""

    name: str
    components: int | None = None


def parse_codec(text: str) -> CodecSpec:
    """``fp16`` | ``int8`` | ``pca`` | ``pca:K`` -> CodecSpec; ConfigError (one line) otherwise."""
    name, _, arg = str(text).strip().lower().partition(":")
    if name not in CODEC_NAMES or (arg and name != "pca"):
        raise ConfigError(
            f"--token-codec {text!r} is not a token codec: use fp16, int8, pca (components chosen by "
            "--token-fidelity) or pca:K (K principal components)"
        )
    if not arg:
        return CodecSpec(name)
    if not arg.isdigit() or int(arg) < 1:
        raise ConfigError(f"--token-codec {text!r}: K must be a positive integer, as in pca:96")
    return CodecSpec(name, int(arg))


def codec_name(identity: dict) -> str:
    """The token codec of an identity or manifest (``fp16`` for stores that predate codecs)."""
    return str((identity.get("token_codec") or {}).get("name", "fp16"))


def token_dim(identity: dict) -> int:
    """Values stored per token: the teacher dim, or the projection's components (``pca``)."""
    codec = identity.get("token_codec") or {}
    return int(codec["components"]) if codec.get("name") == "pca" else int(identity["dim"])


# ---- int8 ------------------------------------------------------------------------------------------
def quantize(x: np.ndarray, block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-token int8 of ``x [..., D]``: (q int8 [..., D], scale float16 [...]).

    ``scale = max|x| / 127`` rounded to float16 first, so ``q * scale`` decodes with the stored scale;
    an all-zero token has scale 0 and q 0. float32 arithmetic in numpy, ``block`` tokens at a time (a
    block stays in the cache; numpy releases the GIL and uses no thread pool, so writer threads quantize
    side by side): ~3x faster per core than the same ops in torch, and the same bytes
    (tests/test_quantize.py compares them with torch's ops). Only the exact float16 -> float32 cast of a
    block is torch's (one small copy; writer threads run torch with one thread).
    """
    import torch

    x = np.asarray(x)
    d = x.shape[-1]
    flat = np.ascontiguousarray(x.reshape(-1, d))
    n = len(flat)
    q, scale = np.empty((n, d), np.int8), np.empty(n, np.float16)
    f = np.empty((min(block, n), d), np.float32)
    mag = np.empty_like(f)
    for i in range(0, n, block):
        j = min(i + block, n)
        fb, ab = f[: j - i], mag[: j - i]
        if flat.dtype == np.float16:  # exact either way; torch's F16C cast is 2x numpy's, half the work
            torch.from_numpy(fb).copy_(torch.from_numpy(flat[i:j]))
        else:
            np.copyto(fb, flat[i:j], casting="unsafe")  # float32
        amax = np.abs(fb, out=ab).max(axis=1)
        amax /= np.float32(_QMAX)
        scale[i:j] = np.minimum(amax, np.float32(_F16_MAX), out=amax)  # rounded to float16 here
        s = scale[i:j].astype(np.float32)
        zero = ~(s > 0)  # 0 or NaN: the token's q is 0
        s[zero] = 1.0
        np.divide(fb, s[:, None], out=fb)
        fb[zero] = 0.0
        np.clip(np.rint(fb, out=fb), -_QMAX, _QMAX, out=fb)
        q[i:j] = fb
    return q.reshape(x.shape), scale.reshape(x.shape[:-1])


def dequantize(q: np.ndarray, scale: np.ndarray) -> Any:
    """float32 ``q * scale`` (q int8 [..., D], scale [...]), a torch tensor."""
    import torch

    s = torch.from_numpy(np.ascontiguousarray(scale)).to(torch.float32).unsqueeze(-1)
    return torch.from_numpy(np.ascontiguousarray(q)).to(torch.float32).mul_(s)


# ---- the projection -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Projection:
    """The top ``k`` principal directions of a sample of tokens: ``mean`` float32 [Dt], ``basis``
    float32 [k, Dt] (orthonormal rows)."""

    mean: np.ndarray
    basis: np.ndarray

    @property
    def components(self) -> int:
        return int(self.basis.shape[0])

    def sha256(self) -> str:
        """Hash of the values (little-endian float32 mean, then basis): part of the store identity."""
        h = hashlib.sha256()
        for a in (self.mean, self.basis):
            h.update(np.ascontiguousarray(a, dtype="<f4").tobytes())
        return h.hexdigest()

    def project(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, np.float32) - self.mean) @ self.basis.T

    def restore(self, z: np.ndarray) -> np.ndarray:
        return z @ self.basis + self.mean


def principal_directions(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean [Dt], all directions [Dt, Dt] by decreasing variance, their variances) of tokens [m, Dt]."""
    x = np.asarray(tokens, dtype=np.float64).reshape(-1, tokens.shape[-1])
    mean = x.mean(axis=0)
    xc = x - mean
    cov = xc.T @ xc / max(len(x) - 1, 1)
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1]
    return mean.astype(np.float32), vectors[:, order].T.astype(np.float32), values[order]


def fit_projection(
    tokens: np.ndarray, components: int | None, fidelity: float, holdout: np.ndarray | None = None
) -> tuple[Projection, float]:
    """Fit a projection on sample views ``tokens [m, T, Dt]``; returns it and its fidelity.

    ``components`` fixes k; None picks the fewest (a multiple of 8, or Dt) whose fidelity on
    ``holdout`` views ``[h, T, Dt]`` (default: the sample) reaches ``fidelity``. Fidelity is
    ``1 - mean |cos(decoded) - cos(reference)|`` over the token-token cosine matrices of each view,
    after the int8 step (`cospress.store.fidelity.token_cosine_error`).
    """
    from cospress.store.fidelity import token_cosine_error

    dt = int(tokens.shape[-1])
    mean, directions, _ = principal_directions(tokens)
    check = tokens if holdout is None else holdout

    def score(k: int) -> tuple[Projection, float]:
        proj = Projection(mean, np.ascontiguousarray(directions[:k]))
        decoded = decode_tokens("pca", *encode_tokens("pca", check, proj), proj)
        return proj, 1.0 - token_cosine_error(check, decoded)["mean"]

    if components is not None:
        if components > dt:
            raise ConfigError(
                f"--token-codec pca:{components} asks for more components than the teacher dim {dt}"
            )
        return score(components)
    candidates = sorted({*range(8, dt, 8), dt})
    scores: dict[int, tuple[Projection, float]] = {}
    lo, hi = 0, len(candidates) - 1  # fidelity grows with k: the fewest that reach the target
    while lo < hi:
        mid = (lo + hi) // 2
        scores[mid] = score(candidates[mid])
        if scores[mid][1] >= fidelity:
            hi = mid
        else:
            lo = mid + 1
    return scores[lo] if lo in scores else score(candidates[lo])


# ---- encode / decode ------------------------------------------------------------------------------
def encode_tokens(
    name: str, tokens: np.ndarray, projection: Projection | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Float tokens ``[..., Dt]`` -> what the store keeps: (tokens, token_scale or None)."""
    if name == "fp16":
        return np.asarray(tokens).astype(np.float16, copy=False), None
    if name == "int8":
        return quantize(tokens)
    if name == "pca":
        if projection is None:
            raise StoreError("a pca store needs its projection to encode tokens")
        x = np.asarray(tokens, np.float32)
        z = projection.project(x)
        z[~np.any(x != 0, axis=-1)] = 0  # a skipped row's zero tokens stay zero (scale 0)
        return quantize(z)
    raise StoreError(f"unknown token codec {name!r}; this cospress knows {', '.join(CODEC_NAMES)}")


def decode_tokens(
    name: str, tokens: np.ndarray, scale: np.ndarray | None, projection: Projection | None = None
) -> np.ndarray:
    """What the store keeps -> float16 tokens ``[..., Dt]`` (a zero scale decodes to a zero token)."""
    import torch

    if name == "fp16":
        return tokens
    if scale is None:
        raise StoreError(f"a {name} store needs token_scale to decode its tokens")
    from cospress.store.guard import check_scale

    check_scale(scale, "the store")  # NaN, inf or a negative scale: refused, never decoded
    x = dequantize(tokens, scale)
    if name == "pca":
        if projection is None:
            raise StoreError("a pca store needs its projection (token_projection/) to decode tokens")
        basis, mean = torch.from_numpy(projection.basis), torch.from_numpy(projection.mean)
        x = torch.addmm(mean, x.reshape(-1, x.shape[-1]), basis).reshape(*x.shape[:-1], -1)
        x[torch.from_numpy(np.asarray(scale) == 0)] = 0
    return x.to(torch.float16).numpy()


def stored_bytes_per_token(name: str, dim: int, components: int | None = None) -> int:
    """Uncompressed bytes per token: 2 Dt (fp16), Dt + 2 (int8), k + 2 (pca)."""
    if name == "fp16":
        return 2 * dim
    return (dim if name == "int8" else int(components or dim)) + 2


__all__ = [
    "CODEC_NAMES",
    "CodecSpec",
    "Projection",
    "codec_name",
    "decode_tokens",
    "encode_tokens",
    "fit_projection",
    "parse_codec",
    "quantize",
    "dequantize",
    "stored_bytes_per_token",
    "token_dim",
]
