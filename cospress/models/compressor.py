"""The CosPress compressor h: teacher space (Dt) -> student space (Ds), applied per token."""

from __future__ import annotations

import torch
from torch import nn

from cospress.models.features import Features

__all__ = ["Compressor"]


class Compressor(nn.Module):
    """`LayerNorm(dt) -> Linear(dt, ds)` ("linear", the paper's h), or
    `LayerNorm(dt) -> Linear(dt, hidden) -> GELU -> Linear(hidden, ds)` ("mlp", for ablations).

    `forward` maps a tensor [..., dt] -> [..., ds], or `Features(cls [B, dt], tokens [B, T, dt])`
    -> `Features(cls [B, ds], tokens [B, T, ds])` with the same module on CLS and every token.
    """

    def __init__(self, dt: int, ds: int, kind: str = "linear", hidden: int | None = None) -> None:
        super().__init__()
        if kind not in ("linear", "mlp"):
            raise ValueError(f"unknown compressor kind {kind!r}; use 'linear' or 'mlp'")
        self.dt, self.ds, self.kind = int(dt), int(ds), kind
        if kind == "linear":
            self.net = nn.Sequential(nn.LayerNorm(dt), nn.Linear(dt, ds))
        else:
            hidden = int(hidden or max(dt, ds))
            self.net = nn.Sequential(
                nn.LayerNorm(dt), nn.Linear(dt, hidden), nn.GELU(), nn.Linear(hidden, ds)
            )

    def forward(self, x: torch.Tensor | Features) -> torch.Tensor | Features:
        if isinstance(x, Features):
            return Features(cls=self.net(x.cls), tokens=self.net(x.tokens))
        return self.net(x)

    def extra_repr(self) -> str:
        return f"dt={self.dt}, ds={self.ds}, kind={self.kind!r}"
