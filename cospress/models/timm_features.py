"""`FeatureModel`: one wrapper that turns any timm model into a `Features` producer.

ViTs (models with `num_prefix_tokens`): the `forward_features` output (after the final norm);
CLS = token 0 when the model has a class token, else the pooled vector; patch tokens = everything
after the prefix tokens (class, distillation and register tokens are dropped).
CNNs and other spatial models: the last feature map from `forward_features`, flattened row-major
to tokens, and the pooled vector (`forward_head(pre_logits=True)`) as CLS.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from typing import Any
from urllib.error import URLError
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from cospress.errors import CospressError
from cospress.models.features import Features
from cospress.utils import sha256_json

log = logging.getLogger(__name__)


def is_vit(model: nn.Module) -> bool:
    """True for token models (timm ViT, DeiT, EVA, ...): they expose `num_prefix_tokens`."""
    return hasattr(model, "num_prefix_tokens")


def _has_class_token(model: nn.Module) -> bool:
    if hasattr(model, "has_class_token"):
        return bool(model.has_class_token)
    return getattr(model, "cls_token", None) is not None


class FeatureModel(nn.Module):
    """A timm model that maps images to `Features(cls [B, D], tokens [B, T, D])`.

    `forward` takes uint8 pixels [B, 3, H, W] (scaled to [0, 1] and normalised with `mean`/`std`
    inside, on the model's device) or float images already normalised. H = W = `input_size`.
    """

    def __init__(
        self,
        model: nn.Module,
        name: str,
        input_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        source: str = "random",
    ) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.arch = str(getattr(model, "default_cfg", {}).get("architecture", name))
        self.input_size = int(input_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.source = source
        self.vit = is_vit(model)
        self.layer = "final_norm" if self.vit else "last_stage"
        self.channels_last = False
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, -1, 1, 1), persistent=False)
        self._sha_key: tuple | None = None
        self._sha: str | None = None
        self.grid, self.dim = self._probe()
        self.num_tokens = self.grid[0] * self.grid[1]

    # ------------------------------------------------------------------ shapes
    def _probe(self) -> tuple[tuple[int, int], int]:
        """(grid, dim) from the patch embed for ViTs, else from one tiny no-grad forward."""
        grid = getattr(getattr(self.model, "patch_embed", None), "grid_size", None)
        if self.vit and grid is not None:
            return (int(grid[0]), int(grid[1])), int(self.model.num_features)
        was_training = self.model.training
        self.model.eval()
        try:
            device = next(self.model.parameters()).device
            x = torch.zeros(1, 3, self.input_size, self.input_size, device=device)
            with torch.no_grad():
                feats, grid = self._extract(x)
        finally:
            self.model.train(was_training)
        if grid is None:  # a token model without a patch embed: assume a square grid
            t = feats.tokens.shape[1]
            side = max(math.isqrt(t), 1)
            grid = (side, t // side)
        return grid, int(feats.cls.shape[-1])

    # ------------------------------------------------------------------ forward
    def to_channels_last(self) -> FeatureModel:
        """Use channels_last memory format (faster convolutions); a no-op for ViTs."""
        if not self.vit:
            self.model.to(memory_format=torch.channels_last)
            self.channels_last = True
        return self

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> normalised float; float input is only moved to the device."""
        device = self._mean.device
        dtype = next(self.model.parameters()).dtype
        x = images.to(device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = (x.float().div_(255.0) - self._mean) / self._std
        x = x.to(dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, images: torch.Tensor) -> Features:
        """images [B, 3, S, S] (uint8 or normalised float) -> Features(cls [B, D], tokens [B, T, D])."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise CospressError(f"{self.name}: expected images [B, 3, H, W], got {tuple(images.shape)}")
        if tuple(images.shape[-2:]) != (self.input_size, self.input_size):
            raise CospressError(
                f"{self.name}: input is {images.shape[-2]}x{images.shape[-1]} px but the model was built "
                f"for {self.input_size} px; resize the views to {self.input_size} or rebuild at that size"
            )
        return self._extract(self.preprocess(images))[0]

    def _extract(self, x: torch.Tensor) -> tuple[Features, tuple[int, int] | None]:
        """Normalised images -> (Features, the spatial grid when the output is a map)."""
        m = self.model
        grid = None
        out = m.forward_features(x)
        if isinstance(out, (list, tuple)):
            out = out[-1]
        if out.ndim == 3:  # token sequence [B, N, D]
            prefix = int(getattr(m, "num_prefix_tokens", 0))
            tokens = out[:, prefix:]
            if _has_class_token(m) and prefix > 0:
                cls = out[:, 0]
            else:
                cls = m.forward_head(out, pre_logits=True)
        elif out.ndim == 4:  # spatial map
            if getattr(m, "output_fmt", "NCHW") == "NHWC":
                b, h, w, c = out.shape
                tokens = out.reshape(b, h * w, c)
            else:
                b, c, h, w = out.shape
                tokens = out.flatten(2).transpose(1, 2)
            grid = (h, w)
            cls = m.forward_head(out, pre_logits=True)
        else:
            raise CospressError(f"{self.name}: unsupported forward_features output {tuple(out.shape)}")
        if cls.ndim != 2:
            cls = cls.flatten(1)
        return Features(cls=cls, tokens=tokens), grid

    # ------------------------------------------------------------------ identity
    def weights_sha256(self) -> str:
        """sha256 of the wrapped model's state dict; recomputed only after the weights change."""
        state = self.model.state_dict()
        key = tuple((k, v.data_ptr(), v._version) for k, v in state.items())
        if self._sha is None or key != self._sha_key:
            # 0-dim tensors (BN num_batches_tracked) as [1]: sha256_state_dict cannot view them
            self._sha = sha256_state_dict({k: v.reshape(1) if v.ndim == 0 else v for k, v in state.items()})
            self._sha_key = key
        return self._sha

    def fingerprint(self) -> str:
        """sha256 over the weights, name, input size, mean/std and layer."""
        return sha256_json(
            {
                "weights_sha256": self.weights_sha256(),
                "name": self.name,
                "input_size": self.input_size,
                "mean": list(self.mean),
                "std": list(self.std),
                "layer": self.layer,
            }
        )

    def describe(self) -> dict[str, Any]:
        """JSON-able identity of the model, as recorded in store manifests and checkpoints."""
        return {
            "name": self.name,
            "arch": self.arch,
            "source": self.source,
            "weights_sha256": self.weights_sha256(),
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "layer": self.layer,
            "grid": list(self.grid),
            "dim": self.dim,
            "num_tokens": self.num_tokens,
            "fingerprint": self.fingerprint(),
        }

    def extra_repr(self) -> str:
        return f"name={self.name!r}, input_size={self.input_size}, grid={self.grid}, dim={self.dim}"


# ---------------------------------------------------------------------- creating timm models
def _offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        from huggingface_hub import constants

        return flag or bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub ships with timm
        return flag


def _hub_weights_cached(cfg: dict[str, Any]) -> bool:
    """Whether the pretrained weights that timm would fetch for `cfg` are already on disk."""
    if cfg.get("file"):
        return os.path.exists(cfg["file"])
    if cfg.get("hf_hub_id"):
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = str(cfg["hf_hub_id"]).partition("@")
        names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else []
        names += [
            "model.safetensors",
            "pytorch_model.bin",
            "open_clip_model.safetensors",
            "open_clip_pytorch_model.bin",
        ]
        for filename in names:
            hit = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(hit, str) and os.path.exists(hit):
                return True
        return False
    if cfg.get("url"):
        filename = os.path.basename(urlparse(cfg["url"]).path)
        return os.path.exists(os.path.join(torch.hub.get_dir(), "checkpoints", filename))
    return False


def check_pretrained_available(name: str) -> None:
    """Raise a `CospressError` now (not after a long download attempt) when the hub weights of
    `name` cannot be had: the model has none, or we are offline and they are not cached."""
    cfg = timm.models.get_pretrained_cfg(name)
    cfg = cfg.to_dict() if cfg is not None else {}
    if not any(cfg.get(k) for k in ("file", "url", "hf_hub_id")):
        raise CospressError(
            f"timm model {name!r} has no pretrained weights; pick a tagged name "
            f"(timm.list_pretrained('{name.split('.')[0]}*')) or pass --weights PATH"
        )
    if _offline() and not _hub_weights_cached(cfg):
        raise CospressError(
            f"the weights of {name!r} are not in the local cache and HF_HUB_OFFLINE is set; "
            "unset HF_HUB_OFFLINE with network access to download them once, or pass --weights PATH"
        )


def create_timm_model(name: str, pretrained: bool, image_size: int | None, **kwargs: Any) -> nn.Module:
    """`timm.create_model` with `num_classes=0` and `img_size` (for the models that accept it).

    Hub/network failures become a `CospressError` saying how to fix them.
    """
    if not timm.is_model(name):
        raise CospressError(
            f"unknown model {name!r}; use a timm model name (see timm.list_models()) or a built-in teacher"
        )
    if pretrained:
        check_pretrained_available(name)
    kwargs.setdefault("num_classes", 0)
    try:
        try:
            sized = dict(kwargs, img_size=image_size) if image_size is not None else kwargs
            return timm.create_model(name, pretrained=pretrained, **sized)
        except TypeError as e:
            if image_size is None or "img_size" not in str(e):
                raise
            return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, URLError) as e:  # hub errors (LocalEntryNotFoundError is an OSError), network
        raise CospressError(
            f"cannot fetch the weights of {name!r} ({type(e).__name__}); check the network "
            "or pass --weights PATH"
        ) from e


ATTENTION_CHOICES = ("auto", "fused", "math")


def set_attention(model: nn.Module, mode: str, device: torch.device) -> str:
    """Choose how timm attention layers compute softmax(q k^T) v: ``fused`` (scaled_dot_product_attention)
    or ``math`` (explicit matmuls). Returns the kernel chosen ("fused" / "math"; "n/a" for models
    without timm attention layers).

    auto = fused on CUDA, math on the CPU: PyTorch's CPU flash-attention backward is ~2x slower than
    the explicit matmuls for the short sequences of small students (measured with ViT-Ti/16 in bf16:
    a 192-view training step at 64 px takes 0.57 s fused vs 0.27 s math; at 224 px 0.68 vs 0.47 s).
    The forward alone is about the same either way. Both give the same function up to rounding.
    """
    if mode not in ATTENTION_CHOICES:
        raise CospressError(f"attention {mode!r} is unknown; use one of {', '.join(ATTENTION_CHOICES)}")
    layers = [m for m in model.modules() if hasattr(m, "fused_attn")]
    if not layers:
        return "n/a"
    if mode == "auto":
        mode = "fused" if device.type == "cuda" else "math"
    for m in layers:
        m.fused_attn = mode == "fused"
    return mode


def sha256_state_dict(state: dict[str, torch.Tensor]) -> str:
    """Hash of a state dict's names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
