"""Round-to-nearest: min-max clipping range per row or group, no calibration data."""

from __future__ import annotations

import torch
from torch import nn

from ..config import QuantConfig


@torch.no_grad()
def quantize_rtn(model: nn.Module, cfg: QuantConfig) -> nn.Module:
    from ..engine import wrap_layers
    for layer in wrap_layers(model, cfg, lwc=False, lora_rank=0):
        for q in layer.values():
            q.finalize()
    return model
