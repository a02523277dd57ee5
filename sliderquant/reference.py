"""The quantizers of docs/algorithm.md section 4 in plain PyTorch, written to be read.

This module is the source of truth for the math and the oracle of the tests: the C kernels in
``csrc/`` compute exactly these functions (up to floating-point summation order), and their
backward passes are what autograd computes here.  It also serves CUDA tensors and machines
without the compiled extension.

Conventions shared with the C kernels:

* Everything is computed in float32; a bf16 weight is widened first and the result is rounded
  back to the input dtype (round to nearest even, as ``Tensor.to``).
* ``round`` is round-half-to-even (``torch.round``).  The rounding of ``W / s`` uses the
  straight-through estimator; the zero point's rounding carries no gradient (OmniQuant).
* The clipping range comes from ``amax``/``amin`` of the whole row or group, so gradient
  reaches the extreme elements (ties share it evenly, as ``torch.amax`` does) and the LWC
  logits through ``sigmoid``.  With ``lwc_param="linear"`` the LWC parameters are the clipping
  factors themselves (``hi = u * max``), with no sigmoid in between.
* ``quant_rate`` quantizes only a prefix of the input columns (or of the groups); the suffix
  passes through unchanged.  The scale and zero point still come from the whole row or group.
* ``round_offset`` (V, out x in, optional) is a learnable rounding offset in units of the step:
  codes are ``round(W_t / s + V)`` (straight-through, so ``dW_hat/dV = s`` inside the code range
  and 0 where the code is clamped).  It moves the rounding decision only; the range, scale and
  zero point do not see it, and the unquantized suffix ignores it.
"""

from __future__ import annotations

import math

import torch

SCALE_MIN = 1e-5
SCALE_MAX = 1e4


def quantized_prefix(width: int, quant_rate: float, group_size: int | None = None) -> int:
    """Number of leading columns quantized at ``quant_rate`` (whole groups when grouped)."""
    if not 0.0 <= quant_rate <= 1.0 or math.isnan(quant_rate):
        raise ValueError(f"quant_rate must lie in [0, 1], got {quant_rate}")
    if group_size is None or group_size == width:
        return min(width, math.ceil(quant_rate * width))
    n_groups = width // group_size
    return min(n_groups, math.ceil(quant_rate * n_groups)) * group_size


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """``(qmin, qmax)`` of the integer codes: ``[0, 2^b - 1]``, or ``[-2^(b-1), 2^(b-1) - 1]`` symmetric."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def minmax_grid(hi: torch.Tensor, lo: torch.Tensor, bits: int, symmetric: bool):
    """``(scale, zero, qmin, qmax)`` of the grid spanning the clipping range ``[lo, hi]``.

    The one min-max grid of the project: the fake quantizers here, GPTQ and (through ``ops``)
    RTN use it; ``csrc/sq_common.h`` is its C twin, tested against it.  Asymmetric:
    ``s = clamp((hi - lo) / (2^b - 1))``, ``z = round(-lo / s)``; symmetric:
    ``s = clamp(max(|hi|, |lo|) / (2^(b-1) - 1))``, ``z = 0``.  The clamp keeps ``s`` finite and
    non-zero for constant or huge rows.
    """
    qmin, qmax = code_range(bits, symmetric)
    if symmetric:
        s = (torch.maximum(hi.abs(), lo.abs()) / qmax).clamp(SCALE_MIN, SCALE_MAX)
        return s, torch.zeros_like(s), qmin, qmax
    s = ((hi - lo) / qmax).clamp(SCALE_MIN, SCALE_MAX)
    return s, torch.round(-lo / s), qmin, qmax


def _fake_quant_rows(x: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor, bits: int,
                     symmetric: bool, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize each row of ``x`` (..., n) with the clipping range ``[lo, hi]`` (..., 1),
    rounding ``x / s + offset`` when an offset (the shape of ``x``) is given."""
    s, z, qmin, qmax = minmax_grid(hi, lo, bits, symmetric)
    t = x / s if offset is None else x / s + offset
    q = torch.clamp(_round_ste(t) + z, qmin, qmax)
    return (q - z) * s


def transformed_weight(w: torch.Tensor, channel_scale=None, lora_a=None, lora_b=None,
                       lora_scaling: float = 1.0) -> torch.Tensor:
    """``W * alpha + scaling * B A`` in float32: the weight that is quantized."""
    wt = w.float()
    if channel_scale is not None:
        wt = wt * channel_scale.float()
    if lora_a is not None:
        wt = wt + lora_scaling * (lora_b.float() @ lora_a.float())
    return wt


LWC_PARAMS = ("sigmoid", "linear")


def lwc_factor(p: torch.Tensor, lwc_param: str = "sigmoid") -> torch.Tensor:
    """The clipping factor of an LWC parameter: ``sigmoid(p)`` (a logit) or ``p`` itself (linear)."""
    if lwc_param not in LWC_PARAMS:
        raise ValueError(f"lwc_param must be 'sigmoid' or 'linear', got {lwc_param!r}")
    return torch.sigmoid(p.float()) if lwc_param == "sigmoid" else p.float()


def _clipped_groups(w, group_size, lwc_upper, lwc_lower, channel_scale, lora_a, lora_b, lora_scaling,
                    lwc_param="sigmoid"):
    """``W_t`` (out, in), the same as (out, n_groups, g), and each group's clipped ``hi``, ``lo``."""
    out_f, in_f = w.shape
    g = in_f if group_size is None else group_size
    n_groups = in_f // g
    wt = transformed_weight(w, channel_scale, lora_a, lora_b, lora_scaling)
    grouped = wt.reshape(out_f, n_groups, g)
    hi = grouped.amax(dim=-1, keepdim=True)
    lo = grouped.amin(dim=-1, keepdim=True)
    if lwc_upper is not None:
        hi = lwc_factor(lwc_upper, lwc_param).reshape(out_f, n_groups, 1) * hi
    if lwc_lower is not None:
        lo = lwc_factor(lwc_lower, lwc_param).reshape(out_f, n_groups, 1) * lo
    return wt, grouped, hi, lo


def _grouped_offset(round_offset, grouped):
    return None if round_offset is None else round_offset.float().reshape(grouped.shape)


def fake_quant_weight(w, bits, group_size=None, symmetric=False, lwc_upper=None, lwc_lower=None,
                      channel_scale=None, lora_a=None, lora_b=None, lora_scaling=1.0,
                      quant_rate=1.0, round_offset=None, lwc_param="sigmoid"):
    """``W_hat = Q(W * alpha + s B A)`` with learnable weight clipping; returns ``w.dtype``.

    ``lwc_upper``/``lwc_lower`` are logits (or, ``lwc_param="linear"``, factors) of shape (out, 1)
    or (out, in // group_size); ``None`` means no clipping (factor 1).  ``round_offset``: the
    rounding offset V (out, in).
    """
    out_f, in_f = w.shape
    wt, grouped, hi, lo = _clipped_groups(w, group_size, lwc_upper, lwc_lower, channel_scale, lora_a, lora_b,
                                          lora_scaling, lwc_param)
    wq = _fake_quant_rows(grouped, hi, lo, bits, symmetric, _grouped_offset(round_offset, grouped)
                          ).reshape(out_f, in_f)
    n_q = quantized_prefix(in_f, quant_rate, group_size)
    if n_q < in_f:
        wq = torch.cat([wq[:, :n_q], wt[:, n_q:]], dim=1)
    return wq.to(w.dtype)


def fake_quant_act(x, bits, symmetric=False, channel_scale=None, quant_rate=1.0):
    """Per-token dynamic fake quantization of ``X / alpha`` over the last dimension."""
    xt = x.float()
    if channel_scale is not None:
        xt = xt / channel_scale.float()
    hi = xt.amax(dim=-1, keepdim=True)
    lo = xt.amin(dim=-1, keepdim=True)
    xq = _fake_quant_rows(xt, hi, lo, bits, symmetric)
    n_q = quantized_prefix(x.shape[-1], quant_rate)
    if n_q < x.shape[-1]:
        xq = torch.cat([xq[..., :n_q], xt[..., n_q:]], dim=-1)
    return xq.to(x.dtype)


def weight_qparams(w, bits, group_size=None, symmetric=False, lwc_upper=None, lwc_lower=None,
                   channel_scale=None, lora_a=None, lora_b=None, lora_scaling=1.0, round_offset=None,
                   lwc_param="sigmoid"):
    """Integer codes, scales and zero points of the fully quantized weight (no gradient).

    Returns ``(q, scale, zero)``: ``q`` int16 (out, in) in ``[0, 2^b - 1]`` (asymmetric) or
    ``[-2^(b-1), 2^(b-1) - 1]`` (symmetric), ``scale`` and ``zero`` float32 (out, n_groups);
    ``zero`` is all zeros when symmetric.  ``(q - zero) * scale`` equals ``fake_quant_weight``.
    """
    with torch.no_grad():
        out_f, in_f = w.shape
        _, grouped, hi, lo = _clipped_groups(w, group_size, lwc_upper, lwc_lower, channel_scale, lora_a, lora_b,
                                             lora_scaling, lwc_param)
        s, z, qmin, qmax = minmax_grid(hi, lo, bits, symmetric)
        offset = _grouped_offset(round_offset, grouped)
        t = grouped / s if offset is None else grouped / s + offset
        q = torch.clamp(torch.round(t) + z, qmin, qmax)
        n_groups = grouped.shape[1]
        return (q.reshape(out_f, in_f).to(torch.int16), s.reshape(out_f, n_groups),
                z.reshape(out_f, n_groups))
