"""The one feature interface shared by every teacher, student and compressor."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Features:
    """Global and per-token features of a batch.

    cls: [B, D] global vector (ViT CLS token, or a CNN's pooled vector).
    tokens: [B, T, D] patch tokens (ViT patches without prefix/register tokens,
        or a CNN's last spatial map flattened row-major); T may be 0.
    """

    cls: torch.Tensor
    tokens: torch.Tensor

    @property
    def dim(self) -> int:
        return self.cls.shape[-1]

    def all_tokens(self) -> torch.Tensor:
        """CLS followed by the patch tokens: [B, 1 + T, D]."""
        return torch.cat([self.cls[:, None], self.tokens], dim=1)

    def to(self, *args, **kwargs) -> Features:
        return Features(self.cls.to(*args, **kwargs), self.tokens.to(*args, **kwargs))

    def float(self) -> Features:
        return Features(self.cls.float(), self.tokens.float())


def resample_tokens(
    tokens: torch.Tensor, grid_from: tuple[int, int], grid_to: tuple[int, int]
) -> torch.Tensor:
    """Resample a row-major token map [B, h*w, D] to [B, h'*w', D]: area down, bilinear up.

    An axis that shrinks is averaged over its source cells (``adaptive_avg_pool2d``: every source
    token counts, and a constant map stays exactly constant); an axis that grows is interpolated
    bilinearly (``align_corners=False``). Identity (the same tensor) when the grids are equal.
    """
    (h, w), (h2, w2) = tuple(grid_from), tuple(grid_to)
    if (h, w) == (h2, w2):
        return tokens
    b, t, d = tokens.shape
    if t != h * w:
        raise ValueError(f"tokens have T={t} but grid_from {h}x{w} needs {h * w}")
    x = tokens.transpose(1, 2).reshape(b, d, h, w)
    dtype = x.dtype
    if dtype in (torch.float16, torch.bfloat16) and x.device.type == "cpu":
        x = x.float()
    down = (min(h, h2), min(w, w2))
    if down != (h, w):
        x = torch.nn.functional.adaptive_avg_pool2d(x, down)
    if down != (h2, w2):
        x = torch.nn.functional.interpolate(x, size=(h2, w2), mode="bilinear", align_corners=False)
    return x.to(dtype).flatten(2).transpose(1, 2)
