"""The ranges every part of sliderquant accepts for bit widths and group sizes, checked in one place.

The config, the kernels' Python wrappers, the methods and the analysis tools all call these two
functions, so a bit width or group size is accepted or refused the same way everywhere.  Bits run
from 2 to 8: below 2 a min-max grid has a single level for asymmetric quantization and none at
all for symmetric (every weight would become zero); above 8 the int16 codes and packed formats
stop paying off.  Imports nothing of ours (ground floor).
"""

from __future__ import annotations

MIN_BITS = 2
MAX_BITS = 8
FULL_PRECISION_BITS = 16    # ``abits: 16`` means activations are not quantized


def check_bits(bits, name: str = "bits") -> int:
    """``bits`` as an int, or ``ValueError`` unless it is an integer from 2 to 8."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{name} must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    return bits


def check_group_size(group_size, in_features: int | None = None, name: str = "group_size"):
    """``group_size`` (a positive int, or ``None`` for per-channel), or ``ValueError``.

    With ``in_features`` the group size must also divide the row exactly (the kernels and packed
    formats assume whole groups); a group as wide as the row is the same as per-channel and
    returns ``None``.
    """
    if group_size is None:
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"{name} must be a positive integer or None (per channel), got {group_size!r}")
    if in_features is not None:
        if in_features % group_size:
            raise ValueError(f"{name} {group_size} does not divide the {in_features} input features; "
                             f"choose a divisor or per-channel quantization ({name}: null)")
        if group_size == in_features:
            return None
    return group_size
