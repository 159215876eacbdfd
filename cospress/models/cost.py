"""What a model costs: its parameter count and its FLOPs for one image at its input size."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


def model_cost(model: Any) -> dict[str, float]:
    """``params`` (all of the feature model's parameters) and ``gflops_per_image``.

    FLOPs are counted by torch's ``FlopCounterMode`` over one forward pass of one image at the model's
    ``input_size`` (matrix products and convolutions, 2 FLOPs per multiply-accumulate, as torch counts
    them; timm's tables give multiply-accumulates, half of this). timm attention layers are counted
    with explicit matmuls (torch does not count the CPU's fused attention kernel), then put back as
    they were. ``model``: a cospress FeatureModel.
    """
    params = sum(p.numel() for p in model.parameters())
    device = next(model.parameters()).device
    size = int(model.input_size)
    x = torch.zeros(1, 3, size, size, dtype=torch.uint8, device=device)
    layers = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    counter = FlopCounterMode(display=False)
    try:
        for m, _ in layers:
            m.fused_attn = False
        with torch.no_grad(), counter:
            model(x)
    finally:
        for m, fused in layers:
            m.fused_attn = fused
    return {"params": int(params), "gflops_per_image": counter.get_total_flops() / 1e9}
