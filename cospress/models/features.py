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
