"""What every method does to a model: wrap its linears, run its layers, collect the codes.

* ``fp32_layer_inputs``: the decoder layers in float32 while a method works on them, with the
  layer-0 inputs of the calibration tokens (and the keyword arguments the model passes its
  layers) captured once; the layers go back to their dtype afterwards, whatever happens.
* ``wrap_layers`` swaps every linear of every decoder layer for a ``QuantLinear``;
  ``attach_state`` swaps the finalized ones back for plain linears and keeps their integer codes,
  scales and zero points on ``model.sliderquant_state``.
* ``teacher_mode``: the same wrapped layers in full precision (the reconstruction target).
* ``forward_layers``: a no-grad pass through some layers in fixed chunks of samples, so the same
  inputs always give bitwise the same outputs (what makes resume exact).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .. import models
from ..layers import QuantLinear

CHUNK = 8                              # samples per no-grad forward


@contextlib.contextmanager
def fp32_layer_inputs(model: nn.Module, calibration: torch.Tensor):
    """Yields ``(x0, layer_kwargs)`` in float32 with the decoder layers in float32 meanwhile.

    Codes must be attached (``attach_state``) inside the block, before the layers are cast back,
    so that scales stay exact float32 and codes come from the float32 weights.
    """
    layers = models.decoder_layers(model)
    dtype = next(layers.parameters()).dtype
    layers.float()
    try:
        x0, layer_kwargs = models.capture_layer0_inputs(model, calibration)
        yield x0.float(), models.kwargs_to(layer_kwargs, dtype=torch.float32)
    finally:
        layers.to(dtype)


def wrap_layers(model: nn.Module, cfg, lwc: bool, lora_rank: int, channel_scale: bool = False,
                round_offset: bool = False, input_sq: list[dict[str, torch.Tensor]] | None = None
                ) -> list[dict[str, QuantLinear]]:
    """Swap every linear of every decoder layer for a ``QuantLinear``; one dict per layer.
    ``round_offset``: give each a learnable rounding offset V; with ``lwc``, the clipping parameters
    follow ``cfg.lwc_param`` and ``cfg.lwc_init`` (``QuantLinear``); ``input_sq`` (per layer, per
    linear: its input channels' mean squares, ``input_mean_squares``) weighs the ``search_act`` start.

    LoRA factors are drawn from a generator seeded by (seed, layer, linear), never from the
    global RNG, so a resumed run draws the same ones."""
    wrapped = []
    for i, layer in enumerate(models.decoder_layers(model)):
        qls = {}
        for j, (name, lin) in enumerate(models.layer_linears(model, layer).items()):
            if isinstance(lin, QuantLinear):
                raise RuntimeError("this model is already quantized by sliderquant")
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i * 1009 + j)
            ql = QuantLinear(lin, cfg.wbits, cfg.group_size, cfg.symmetric, cfg.abits,
                             lora_rank=lora_rank, lwc=lwc, channel_scale=channel_scale,
                             lora_scaling=cfg.lora_alpha / max(lora_rank, 1), generator=gen,
                             round_offset=round_offset, lwc_param=cfg.lwc_param, lwc_init=cfg.lwc_init,
                             input_sq=None if input_sq is None else input_sq[i][name])
            ql.to(lin.weight.device)
            models.set_submodule(layer, name, ql)
            qls[name] = ql
        wrapped.append(qls)
    return wrapped


def attach_state(model: nn.Module, cfg) -> None:
    """Replace finalized ``QuantLinear``s by plain linears; keep codes/scales/zeros on the model."""
    tensors = {}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantLinear):
            if not mod.finalized:
                raise RuntimeError(f"{name} was not finalized")
            tensors[f"{name}.qweight"] = mod.qweight
            tensors[f"{name}.scales"] = mod.scales
            tensors[f"{name}.zeros"] = mod.zeros
            models.set_submodule(model, name, mod.to_linear())
    model.sliderquant_state = {"config": cfg.to_dict(), "tensors": tensors}


@contextlib.contextmanager
def teacher_mode(qlayers):
    """The same layers in full precision: the teacher of the reconstruction."""
    qls = [q for d in qlayers for q in d.values()]
    for q in qls:
        q.quantize = False
    try:
        yield
    finally:
        for q in qls:
            q.quantize = True


@torch.no_grad()
def input_mean_squares(model: nn.Module, x: torch.Tensor, layer_kwargs: dict, amp) -> list[dict[str, torch.Tensor]]:
    """Per decoder layer and linear, the mean square of each input channel (float32, in_features)
    over every token of ``x`` run through the model's full-precision layers (the teacher's inputs;
    what ``lwc_init: search_act`` weighs the clipping error by).  One no-grad pass, in the chunks of
    ``forward_layers``."""
    layers = models.decoder_layers(model)
    sums: list[dict[str, torch.Tensor]] = [{} for _ in layers]
    hooks = []

    def hook(i, name):
        def record(_mod, args):
            s = args[0].detach().float().reshape(-1, args[0].shape[-1]).square().sum(0, dtype=torch.float64)
            sums[i][name] = sums[i][name] + s if name in sums[i] else s
        return record
    for i, layer in enumerate(layers):
        for name, lin in models.layer_linears(model, layer).items():
            hooks.append(lin.register_forward_pre_hook(hook(i, name)))
    try:
        forward_layers(layers, x, layer_kwargs, amp)
    finally:
        for h in hooks:
            h.remove()
    tokens = x.shape[0] * x.shape[1]        # every linear of a dense layer sees every token once
    return [{name: (s / tokens).float() for name, s in d.items()} for d in sums]


@torch.no_grad()
def forward_layers(layers, x: torch.Tensor, layer_kwargs: dict, amp) -> torch.Tensor:
    """Run ``x`` through ``layers`` in chunks of ``CHUNK`` samples (fixed, so results repeat)."""
    if not len(layers):
        return x
    outs = []
    for start in range(0, x.shape[0], CHUNK):
        h = x[start:start + CHUNK]
        with amp:
            for layer in layers:
                h = models.call_layer(layer, h, layer_kwargs)
        outs.append(h.float())
    return torch.cat(outs)
