"""The quantization grid and its learnable parameters (docs/algorithm.md section 4).

The math itself lives in ``ops`` (C kernels, with ``reference`` as the oracle); this module holds
what is shared by every method: the group size a layer uses, the shape of the LWC logits, and the
dequantization of stored codes.  Group sizes are checked by ``limits.check_group_size``, the rule
every part of the project uses.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .limits import check_group_size

log = logging.getLogger(__name__)

LWC_INIT = 4.0   # sigmoid(4) = 0.982: start with almost no clipping
ROUND_OFFSET_BOUND = 0.5   # V is kept in [-0.5, 0.5]: a code moves by at most one step from round-to-nearest
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


def lwc_logits(out_features: int, in_features: int, group_size: int | None) -> nn.Parameter:
    return nn.Parameter(torch.full((out_features, n_groups(in_features, group_size)), LWC_INIT,
                                   dtype=torch.float32))


def round_offsets(out_features: int, in_features: int) -> nn.Parameter:
    """The learnable rounding offset V (out, in), zero: training starts at round-to-nearest."""
    return nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.float32))


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(q - zero) * scale`` with (out, n_groups) scales broadcast over the groups' columns."""
    out_f, in_f = q.shape
    g = in_f // scale.shape[1]
    w = (q.float().reshape(out_f, -1, g) - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)
    return w.reshape(out_f, in_f)
