"""The quantization grid and its learnable parameters (docs/algorithm.md sections 4 and 11).

The math itself lives in ``ops`` (C kernels, with ``reference`` as the oracle); this module holds
what is shared by every method: the group size a layer uses, the shape and start of the LWC
parameters (logits, or the factors themselves), the rounding offset, and the dequantization of
stored codes.  Group sizes are checked by ``limits.check_group_size``, the rule every part of the
project uses.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from . import ops
from .limits import check_group_size

log = logging.getLogger(__name__)

LWC_INIT = 4.0   # sigmoid(4) = 0.982: start with almost no clipping
ROUND_OFFSET_BOUND = 0.5   # V is kept in [-0.5, 0.5]: a code moves by at most one step from round-to-nearest
LWC_LINEAR_MIN = 0.5       # linear LWC factors are kept in [0.5, 1]
SEARCH_MIN, SEARCH_STEP = 0.6, 0.02   # the clipping search tries factors from the start value down to 0.6
_WARNED: set = set()


def layer_group_size(in_features: int, group_size: int | None) -> int | None:
    """The group size used for a layer ``in_features`` wide (``None`` = per channel).

    Groups must tile a row exactly (the kernels and the packed formats assume it).  When
    ``group_size`` does not divide ``in_features`` (SmolLM2's 576-wide inputs with g128), the
    largest divisor of ``in_features`` below ``group_size`` is used instead, the same for every
    method, and a warning says so once per width.
    """
    if check_group_size(group_size) is None or group_size >= in_features:
        return None
    if in_features % group_size == 0:
        return group_size
    fallback = max(d for d in range(1, group_size) if in_features % d == 0)
    if (in_features, group_size) not in _WARNED:
        _WARNED.add((in_features, group_size))
        log.warning("group_size %d does not divide the %d input features of some layers; they use groups "
                    "of %d instead", group_size, in_features, fallback)
    return fallback


def n_groups(in_features: int, group_size: int | None) -> int:
    """Groups per row; ``ValueError`` unless ``group_size`` divides ``in_features`` (or is None)."""
    group_size = check_group_size(group_size, in_features)
    return 1 if group_size is None else in_features // group_size


def lwc_start(lwc_param: str) -> float:
    """The parameter value of 'no search': logit 4.0 (factor 0.982) or the factor 1.0 (linear)."""
    return LWC_INIT if lwc_param == "sigmoid" else 1.0


def lwc_params(w: torch.Tensor, group_size: int | None, bits: int, symmetric: bool, lwc_param: str = "sigmoid",
               lwc_init: str = "none", input_sq: torch.Tensor | None = None) -> tuple[nn.Parameter, nn.Parameter]:
    """The upper and lower LWC parameters (out, n_groups) of weight ``w``: logits (``sigmoid``) or
    factors (``linear``), at the start value, or (``lwc_init="search"``, ``"search_act"``) at each
    group's factor from ``search_clipping``; ``search_act`` weighs each column's error by ``input_sq``,
    the mean square of that input channel over the calibration tokens."""
    out_f, in_f = w.shape
    if lwc_init == "search_act" and input_sq is None:
        raise ValueError("lwc_init: search_act needs the input channels' mean squares (input_sq)")
    if lwc_init in ("search", "search_act"):
        start = torch.sigmoid(torch.tensor(LWC_INIT)).item() if lwc_param == "sigmoid" else 1.0
        factors = search_clipping(w, bits, group_size, symmetric, start,
                                  input_sq if lwc_init == "search_act" else None)
        if lwc_param == "sigmoid":    # the start itself keeps the exact logit 4.0
            values = torch.where(factors == start, torch.tensor(LWC_INIT), torch.logit(factors.double()).float())
        else:
            values = factors
    else:
        values = torch.full((out_f, n_groups(in_f, group_size)), lwc_start(lwc_param), dtype=torch.float32)
    return nn.Parameter(values.clone()), nn.Parameter(values.clone())


@torch.no_grad()
def search_clipping(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                    start: float = 1.0, input_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Per row or group, the clipping factor (applied to both the max and the min) with the smallest
    weight error ``sum_c (W_hat - W)_c^2`` over the grid ``start, start - 0.02, ..., >= 0.6``; float32
    (out, n_groups).  A tie keeps the larger factor (less clipping).

    ``input_sq`` (in_features,): weigh column ``c``'s error by it, ``sum_c E[x_c^2] (W_hat - W)_c^2``,
    the expected output error of the row when input channels are uncorrelated (activation-aware)."""
    out_f, in_f = w.shape
    g = in_f if group_size is None else group_size
    wf = w.detach().float()
    col = None
    if input_sq is not None:
        if input_sq.shape != (in_f,):
            raise ValueError(f"input_sq must have shape ({in_f},) for a weight of {tuple(w.shape)}, "
                             f"got {tuple(input_sq.shape)}")
        col = input_sq.detach().float().to(wf.device)
        if not torch.isfinite(col).all() or (col < 0).any():
            raise ValueError("input_sq must be finite and >= 0")
    best_err = torch.full((out_f, in_f // g), float("inf"), device=wf.device)
    best = torch.full((out_f, in_f // g), start, dtype=torch.float32, device=wf.device)
    k = 0
    while start - k * SEARCH_STEP >= SEARCH_MIN - 1e-9:
        factor = torch.full_like(best, start - k * SEARCH_STEP)
        w_hat = ops.fake_quant_weight(wf, bits, group_size, symmetric, lwc_upper=factor, lwc_lower=factor,
                                      lwc_param="linear")
        d2 = (w_hat - wf).square()
        err = (d2 if col is None else d2 * col).reshape(out_f, -1, g).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, factor, best)
        k += 1
    return best


def round_offsets(out_features: int, in_features: int) -> nn.Parameter:
    """The learnable rounding offset V (out, in), zero: training starts at round-to-nearest."""
    return nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.float32))


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(q - zero) * scale`` with (out, n_groups) scales broadcast over the groups' columns."""
    out_f, in_f = q.shape
    g = in_f // scale.shape[1]
    w = (q.float().reshape(out_f, -1, g) - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)
    return w.reshape(out_f, in_f)
