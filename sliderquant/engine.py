"""The engine's one entry: check the model and the calibration data, then run the method.

``quantize_model`` looks the method up in the registry (``sliderquant.methods``) and calls its
entry point; the methods themselves live in ``methods/`` (``rtn``, ``gptq``, ``windows`` for
SliderQuant and OmniQuant).  ``plan`` (a windows method's schedule, for ``sliderquant schedule``) and
``resolve_autocast`` (the precision a windows method trains in) are the windows method's own,
importable from here for the command line and the examples.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from . import models
from .config import QuantConfig
from .methods import get_method
from .methods.windows import WindowPlan, resolve_autocast

__all__ = ["quantize_model", "plan", "resolve_autocast"]


def quantize_model(model: nn.Module, cfg: QuantConfig, calibration: torch.Tensor | None = None,
                   work_dir: str | None = None,
                   on_window: Callable[[int, int, dict], None] | None = None) -> nn.Module:
    """Quantize ``model`` in place with ``cfg``; returns it with ``model.sliderquant_state``.

    ``work_dir`` makes a windows method resumable; ``on_window(done, total, row)`` is called after
    each completed window (once the work directory holds it).
    """
    method = get_method(cfg.method)
    models.family_of(model)
    if getattr(model, "sliderquant_state", None) is not None:
        raise ValueError("this model is already quantized by sliderquant; start from the fp model")
    if method.needs_calibration:
        calibration = check_calibration(calibration, model)
    was_training = model.training
    model.eval()
    try:
        method.run(model, cfg, calibration, work_dir=work_dir, on_window=on_window)
    finally:
        model.train(was_training)
    return model


def check_calibration(calibration, model) -> torch.Tensor:
    """``calibration`` as a LongTensor (nsamples, seqlen) of the model's token ids, or ``ValueError``."""
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or \
            calibration.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError("calibration must be a LongTensor of token ids of shape (nsamples, seqlen)")
    if calibration.numel() == 0:
        raise ValueError("calibration is empty; give at least one sequence of token ids")
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and (calibration.min() < 0 or calibration.max() >= vocab):
        raise ValueError(f"calibration token ids must lie in [0, {vocab}) (the model's vocabulary)")
    return calibration.long()


def plan(cfg: QuantConfig, num_layers: int) -> WindowPlan:
    """``(windows, stage ratios, lora rank, epochs per stage)`` of ``cfg.method``; ``ValueError``
    for a method that does not train over windows (``rtn``, ``gptq``)."""
    return get_method(cfg.method).window_plan(cfg, num_layers)
