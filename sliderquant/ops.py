"""Autograd-aware fake-quantization ops over the C kernels (``sliderquant._C``).

``fake_quant_weight`` and ``fake_quant_act`` compute exactly the functions of
:mod:`sliderquant.reference` (docs/algorithm.md section 4).  CPU tensors go through the fused C kernels,
registered as ``torch.library`` custom ops (``sliderquant::fake_quant_weight`` and friends) so that
they compose with autograd and ``torch.compile``; CUDA tensors, and machines where the extension
did not build, use the pure-torch reference.

NaN/Inf: a weight or activation that is not finite (after channel scaling and LoRA), or clipping
logits that make the scale non-finite, raise ``ValueError`` on both paths; nothing is silently
propagated.
"""

from __future__ import annotations

import logging
import math
import os
from typing import List, Optional

import torch
from torch import Tensor

from . import reference
from .limits import check_bits, check_group_size
from .reference import quantized_prefix, weight_qparams  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

try:
    from . import _C
    _C_ERROR: Optional[BaseException] = None
except ImportError as exc:  # the package still works (slowly) without the extension
    _C = None
    _C_ERROR = exc
    log.warning("sliderquant._C is not available (%s); using the pure-torch path", exc)

_DATA_DTYPES = (torch.float32, torch.bfloat16)


def backend() -> str:
    """The kernels in use for CPU tensors: ``'avx2'``, ``'ref'`` (scalar C) or ``'torch'``."""
    if _C is None or os.environ.get("SLIDERQUANT_ISA") == "torch":
        return "torch"
    return _C.backend()


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX-BF16 or AVX512-BF16): then bf16 autocast
    calibrates faster than fp32 (``autocast: auto`` picks it).  False without the extension."""
    return bool(_C is not None and _C.native_bf16())


def set_backend(name: str) -> None:
    """Select the C kernel table: ``'avx2'``, ``'ref'`` or ``'auto'`` (like ``SLIDERQUANT_ISA``)."""
    if _C is None:
        raise RuntimeError(f"the C extension is not available: {_C_ERROR}")
    _C.set_backend(name)


def _use_c(t: Tensor) -> bool:
    return _C is not None and t.device.type == "cpu" and os.environ.get("SLIDERQUANT_ISA") != "torch"


# At least this many elements per thread: below it, waking a second thread costs more than it
# saves (and on a loaded machine a descheduled thread stalls the whole call).
GRAIN = 1 << 18


# Upper bound on the kernels' threads; None = torch.get_num_threads().  (bench threads measures 1.)
KERNEL_THREADS: Optional[int] = None


def _nthreads(numel: int) -> int:
    cap = torch.get_num_threads() if KERNEL_THREADS is None else KERNEL_THREADS
    return max(1, min(cap, -(-numel // GRAIN)))


def _empty() -> Tensor:
    return torch.empty(0)


def _raw(*tensors):
    """Detached views for DLPack (torch refuses to export tensors that require grad)."""
    return [t.detach() if t is not None else None for t in tensors]


# ----------------------------------------------------------------------------- weight op (C)

@torch.library.custom_op("sliderquant::fake_quant_weight", mutates_args=())
def _wq(w: Tensor, channel_scale: Optional[Tensor], lora_a: Optional[Tensor], lora_b: Optional[Tensor],
        lwc_upper: Optional[Tensor], lwc_lower: Optional[Tensor], round_offset: Optional[Tensor], bits: int,
        group_size: int, n_quant: int, symmetric: bool, lora_scaling: float, lwc_linear: bool,
        out_dtype: torch.dtype) -> Tensor:
    out = torch.empty_like(w, dtype=out_dtype, memory_format=torch.contiguous_format)
    w, channel_scale, lora_a, lora_b, lwc_upper, lwc_lower, round_offset = _raw(
        w, channel_scale, lora_a, lora_b, lwc_upper, lwc_lower, round_offset)
    _C.wq_forward(w, channel_scale, lora_a, lora_b, lwc_upper, lwc_lower, out, bits, group_size, n_quant,
                  symmetric, lora_scaling, _nthreads(w.numel()), round_offset, lwc_linear)
    return out


@_wq.register_fake
def _wq_fake(w, channel_scale, lora_a, lora_b, lwc_upper, lwc_lower, round_offset, bits, group_size, n_quant,
             symmetric, lora_scaling, lwc_linear, out_dtype):
    return torch.empty_like(w, dtype=out_dtype, memory_format=torch.contiguous_format)


@torch.library.custom_op("sliderquant::fake_quant_weight_backward", mutates_args=())
def _wq_bwd(grad: Tensor, w: Tensor, channel_scale: Optional[Tensor], lora_a: Optional[Tensor],
            lora_b: Optional[Tensor], lwc_upper: Optional[Tensor], lwc_lower: Optional[Tensor],
            round_offset: Optional[Tensor], bits: int, group_size: int, n_quant: int, symmetric: bool,
            lora_scaling: float, lwc_linear: bool, needs: List[bool]) -> List[Tensor]:
    params = (channel_scale, lora_a, lora_b, lwc_upper, lwc_lower, round_offset)
    outs = [torch.empty_like(p) if (p is not None and need) else None for p, need in zip(params, needs[1:])]
    grad_wt = torch.empty(w.shape, dtype=torch.float32) if needs[0] else None
    raw = _raw(w, *params, grad)
    _C.wq_backward(*raw[:6], raw[7], *outs[:5], grad_wt, bits, group_size, n_quant, symmetric, lora_scaling,
                   _nthreads(w.numel()), raw[6], outs[5], lwc_linear)
    if grad_wt is not None:
        grad_w = (grad_wt * channel_scale.detach() if channel_scale is not None else grad_wt).to(w.dtype)
    else:
        grad_w = None
    return [g if g is not None else _empty() for g in [grad_w] + outs]


@_wq_bwd.register_fake
def _wq_bwd_fake(grad, w, channel_scale, lora_a, lora_b, lwc_upper, lwc_lower, round_offset, bits, group_size,
                 n_quant, symmetric, lora_scaling, lwc_linear, needs):
    tensors = (w, channel_scale, lora_a, lora_b, lwc_upper, lwc_lower, round_offset)
    return [torch.empty_like(t) if (t is not None and need) else w.new_empty(0) for t, need in zip(tensors, needs)]


_WQ_TENSORS = 7     # w, channel_scale, lora_a, lora_b, lwc_upper, lwc_lower, round_offset; then the scalars


def _wq_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:_WQ_TENSORS])
    ctx.scalars = inputs[_WQ_TENSORS:]


def _wq_backward(ctx, grad):
    saved = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:_WQ_TENSORS]]
    grads = _wq_bwd(grad.contiguous(), *saved, *ctx.scalars[:-1], needs)
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None,) * len(ctx.scalars)


_wq.register_autograd(_wq_backward, setup_context=_wq_setup)


# ----------------------------------------------------------------------------- activation op (C)

@torch.library.custom_op("sliderquant::fake_quant_act", mutates_args=())
def _aq(x: Tensor, channel_scale: Optional[Tensor], bits: int, n_quant: int, symmetric: bool) -> Tensor:
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _C.aq_forward(*_raw(x, channel_scale), out, bits, n_quant, symmetric, _nthreads(x.numel()))
    return out


@_aq.register_fake
def _aq_fake(x, channel_scale, bits, n_quant, symmetric):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("sliderquant::fake_quant_act_backward", mutates_args=())
def _aq_bwd(grad: Tensor, x: Tensor, channel_scale: Optional[Tensor], bits: int, n_quant: int, symmetric: bool,
            needs: List[bool]) -> List[Tensor]:
    grad_x = torch.empty_like(x) if needs[0] else None
    grad_cs = torch.empty_like(channel_scale) if (channel_scale is not None and needs[1]) else None
    _C.aq_backward(*_raw(x, channel_scale, grad), grad_x, grad_cs, bits, n_quant, symmetric, _nthreads(x.numel()))
    return [g if g is not None else _empty() for g in (grad_x, grad_cs)]


@_aq_bwd.register_fake
def _aq_bwd_fake(grad, x, channel_scale, bits, n_quant, symmetric, needs):
    return [torch.empty_like(x) if needs[0] else x.new_empty(0),
            torch.empty_like(channel_scale) if (channel_scale is not None and needs[1]) else x.new_empty(0)]


def _aq_setup(ctx, inputs, output):
    x, channel_scale, *scalars = inputs
    ctx.save_for_backward(x, channel_scale)
    ctx.scalars = scalars


def _aq_backward(ctx, grad):
    x, channel_scale = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:2]]
    grads = _aq_bwd(grad.contiguous(), x, channel_scale, *ctx.scalars, needs)
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None,) * 3


_aq.register_autograd(_aq_backward, setup_context=_aq_setup)


# ----------------------------------------------------------------------------- validation

def _check_rate(quant_rate) -> float:
    rate = float(quant_rate)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"quant_rate must lie in [0, 1], got {quant_rate!r}")
    return rate


def _check_data(t, name: str, min_dim: int = 1) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _DATA_DTYPES:
        raise TypeError(f"{name} must be float32 or bfloat16, got {t.dtype}")
    if t.dim() < min_dim or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty tensor with at least {min_dim} dimension(s), got shape "
                         f"{tuple(t.shape)}")
    return t


def _param(t: Optional[Tensor], name: str, shape: tuple, ref: Tensor) -> Optional[Tensor]:
    """A learnable parameter as contiguous float32 (differentiably), after checking its shape and device."""
    if t is None:
        return None
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but the input is on {ref.device}")
    if tuple(t.shape) != shape:
        if t.numel() == math.prod(shape) and t.dim() <= len(shape):
            t = t.reshape(shape)
        else:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    return t.float().contiguous()


def _check_finite(t: Tensor, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} contains NaN or Inf; quantization needs finite values (check the model "
                         "weights, the inputs and the learned channel scales / LoRA factors)")


# The pure-torch path must refuse exactly what the C kernels refuse (sq_grid_make in csrc/sq_common.h):
# a transformed weight or activation that is not finite, and a clipped range or scale that is not.
# These checks run without autograd on values the reference recomputes; that costs one extra pass on
# a path that is only the fallback (CUDA, no extension, SLIDERQUANT_ISA=torch).

def _check_torch_weight(w, group_size, symmetric, lwc_upper, lwc_lower, channel_scale, lora_a, lora_b,
                        lora_scaling, lwc_param="sigmoid") -> None:
    with torch.no_grad():
        out_f, in_f = w.shape
        g = in_f if group_size is None else group_size
        wt = reference.transformed_weight(w, channel_scale, lora_a, lora_b, lora_scaling)
        _check_finite(wt, "the weight (W * channel_scale + LoRA)")
        grouped = wt.reshape(out_f, in_f // g, g)
        hi, lo = grouped.amax(dim=-1), grouped.amin(dim=-1)
        if lwc_upper is not None:
            hi = reference.lwc_factor(lwc_upper, lwc_param) * hi
        if lwc_lower is not None:
            lo = reference.lwc_factor(lwc_lower, lwc_param) * lo
        # torch.maximum propagates NaN (unlike C's fmaxf), so the scale carries a NaN logit through
        s_raw = torch.maximum(hi.abs(), lo.abs()) if symmetric else hi - lo
        if not (bool(torch.isfinite(hi).all()) and bool(torch.isfinite(lo).all())
                and bool(torch.isfinite(s_raw).all())):
            raise ValueError("the quantization scale of the weight is NaN or Inf: the clipping logits "
                             "(lwc_upper / lwc_lower; or factors, lwc_param linear) are not finite")


def _check_torch_round_offset(round_offset, n_quant: int) -> None:
    if round_offset is not None and not bool(torch.isfinite(round_offset.detach()[:, :n_quant]).all()):
        raise ValueError("the rounding offset (round_v) of the weight contains NaN or Inf in its quantized "
                         "columns; it must be finite (it is projected to [-0.5, 0.5] during training)")


def _check_torch_act(x, symmetric, channel_scale) -> None:
    with torch.no_grad():
        xt = x.float() if channel_scale is None else x.float() / channel_scale
        _check_finite(xt, "the activation (x / channel_scale)")
        hi, lo = xt.amax(dim=-1), xt.amin(dim=-1)
        s_raw = torch.maximum(hi.abs(), lo.abs()) if symmetric else hi - lo
        _check_finite(s_raw, "the range of the activation (max - min)")


# ----------------------------------------------------------------------------- public API

def fake_quant_weight(w: Tensor, bits: int, group_size: Optional[int] = None, symmetric: bool = False,
                      lwc_upper: Optional[Tensor] = None, lwc_lower: Optional[Tensor] = None,
                      channel_scale: Optional[Tensor] = None, lora_a: Optional[Tensor] = None,
                      lora_b: Optional[Tensor] = None, lora_scaling: float = 1.0,
                      quant_rate: float = 1.0, out_dtype: Optional[torch.dtype] = None,
                      round_offset: Optional[Tensor] = None, lwc_param: str = "sigmoid") -> Tensor:
    """Fake-quantize a weight: ``Q(W * channel_scale + lora_scaling * lora_b @ lora_a)``.

    Args:
        w: (out_features, in_features), float32 or bfloat16; the result has the same dtype unless
            ``out_dtype`` says otherwise.
        bits: 2 to 8.
        group_size: columns per quantization group (must divide in_features); ``None`` = per channel.
        symmetric: symmetric grid without zero point instead of the default asymmetric one.
        lwc_upper, lwc_lower: learnable clipping logits, (out_features, n_groups); ``None`` = no clipping.
        lwc_param: ``"sigmoid"`` (the factors are ``sigmoid(lwc_upper)``, ``sigmoid(lwc_lower)``) or
            ``"linear"`` (``lwc_upper`` and ``lwc_lower`` are the factors).
        channel_scale: (in_features,) per-input-channel scale ``alpha``.
        lora_a, lora_b: low-rank refinement, (r, in_features) and (out_features, r).
        quant_rate: only the first ``ceil(rate * in_features)`` columns (or ``ceil(rate * n_groups)``
            groups) are quantized; the rest pass through.  Scales come from whole rows/groups.
        out_dtype: float32 or bfloat16 result (default: ``w.dtype``).  Under bf16 autocast, an fp32
            master weight fake-quantized straight to bf16 saves a cast of the result on the way in
            and of its gradient on the way out; the values are those of ``.to(out_dtype)``.
        round_offset: the learnable rounding offset V, (out_features, in_features), finite in the
            quantized columns: codes are ``round(W_t / s + V)``.  ``None`` = plain rounding.

    Differentiable in ``w`` and every parameter (straight-through rounding, docs/algorithm.md section 4.3).
    """
    bits = check_bits(bits)
    if lwc_param not in reference.LWC_PARAMS:
        raise ValueError(f"lwc_param must be 'sigmoid' or 'linear', got {lwc_param!r}")
    w = _check_data(w, "w", 2)
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    group_size = check_group_size(group_size, in_f)
    n_groups = 1 if group_size is None else in_f // group_size
    n_quant = quantized_prefix(in_f, _check_rate(quant_rate), group_size)
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_a and lora_b must be given together")
    if lora_a is not None:
        if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_a.shape[0] != lora_b.shape[1]:
            raise ValueError(f"lora_a must be (r, {in_f}) and lora_b ({out_f}, r), got {tuple(lora_a.shape)} and "
                             f"{tuple(lora_b.shape)}")
        rank = lora_a.shape[0]
        if rank < 1 or (_C is not None and rank > _C.MAX_RANK):
            raise ValueError(f"LoRA rank must be from 1 to 64, got {rank}")
        lora_a = _param(lora_a, "lora_a", (rank, in_f), w)
        lora_b = _param(lora_b, "lora_b", (out_f, rank), w)
    channel_scale = _param(channel_scale, "channel_scale", (in_f,), w)
    lwc_upper = _param(lwc_upper, "lwc_upper", (out_f, n_groups), w)
    lwc_lower = _param(lwc_lower, "lwc_lower", (out_f, n_groups), w)
    if isinstance(round_offset, Tensor) and tuple(round_offset.shape) != (out_f, in_f):
        raise ValueError(f"round_offset must have the shape of w, {(out_f, in_f)}, got {tuple(round_offset.shape)}")
    round_offset = _param(round_offset, "round_offset", (out_f, in_f), w)
    lora_scaling = float(lora_scaling)
    if out_dtype is None:
        out_dtype = w.dtype
    elif out_dtype not in _DATA_DTYPES:
        raise TypeError(f"out_dtype must be torch.float32 or torch.bfloat16, got {out_dtype!r}")
    if not _use_c(w):
        _check_torch_weight(w, group_size, symmetric, lwc_upper, lwc_lower, channel_scale, lora_a, lora_b,
                            lora_scaling, lwc_param)
        _check_torch_round_offset(round_offset, n_quant)
        return reference.fake_quant_weight(w, bits, group_size, symmetric, lwc_upper, lwc_lower, channel_scale,
                                           lora_a, lora_b, lora_scaling, quant_rate, round_offset,
                                           lwc_param).to(out_dtype)
    return _wq(w.contiguous(), channel_scale, lora_a, lora_b, lwc_upper, lwc_lower, round_offset, bits,
               group_size or 0, n_quant, bool(symmetric), lora_scaling, lwc_param == "linear", out_dtype)


def fake_quant_act(x: Tensor, bits: int, symmetric: bool = False, channel_scale: Optional[Tensor] = None,
                   quant_rate: float = 1.0) -> Tensor:
    """Per-token dynamic fake quantization of ``x / channel_scale`` over the last dimension.

    ``x`` is (..., d), float32 or bfloat16; only the first ``ceil(rate * d)`` channels are quantized.
    Differentiable in ``x`` and ``channel_scale`` (straight-through rounding).
    """
    bits = check_bits(bits)
    x = _check_data(x, "x", 1)
    d = x.shape[-1]
    n_quant = quantized_prefix(d, _check_rate(quant_rate))
    channel_scale = _param(channel_scale, "channel_scale", (d,), x)
    if not _use_c(x):
        _check_torch_act(x, symmetric, channel_scale)
        return reference.fake_quant_act(x, bits, symmetric, channel_scale, quant_rate)
    return _aq(x.contiguous(), channel_scale, bits, n_quant, bool(symmetric))
