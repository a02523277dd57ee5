"""Round-to-nearest: the min-max grid of each row or group (``reference.minmax_grid``), no
calibration data and nothing learned."""

from __future__ import annotations

import torch
from torch import nn

from .common import attach_state, wrap_layers


@torch.no_grad()
def run_rtn(model: nn.Module, cfg, calibration=None, work_dir=None, on_window=None) -> nn.Module:
    """Quantize every linear of every decoder layer in the weights' own dtype.  The other
    arguments are the registry's common signature; RTN uses none of them."""
    for layer in wrap_layers(model, cfg, lwc=False, lora_rank=0):
        for q in layer.values():
            q.finalize()
    attach_state(model, cfg)
    return model
