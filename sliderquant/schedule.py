"""The inter-layer window schedule of docs/algorithm.md section 2, as a pure function (no torch).

A window is a tuple of consecutive decoder-layer indices.  ``sliding_windows`` builds the
SliderQuant schedule: progressively expanded windows over the shallow layers (PESW), fixed-size
windows over the intermediate layers, progressively contracted windows over the deep layers (PCSW).
For L = 30 and the defaults it returns the 31 windows
``(0) (0,1) (0,1,2) (0,1,2,3) (3,4) (4,5) ... (25,26) (26..29) (27,28,29) (28,29) (29)``.
"""

from __future__ import annotations

Window = tuple[int, ...]


def sliding_windows(num_layers: int, shallow: int = 4, deep: int = 4, size: int = 2,
                    stride: int = 1) -> list[Window]:
    """SliderQuant windows for ``num_layers`` layers.

    ``shallow`` (Ls) and ``deep`` (Ld) are the lengths of the PESW and PCSW phases; ``size`` and
    ``stride`` describe the intermediate windows, which start at layer ``Ls - 1`` and end at layer
    ``L - Ld`` so that each phase overlaps its neighbour by one layer.  ``Ls = Ld = 0`` gives plain
    fixed windows everywhere (CBQ-like); ``size = stride = 1`` with ``Ls = Ld = 0`` gives OmniQuant.

    Models with fewer than ``Ls + Ld + 1`` layers shrink Ls and Ld (the larger one first) until the
    three phases fit; every layer stays covered, the first and the last layer keep their own
    windows, and repeated windows are dropped.
    """
    _check_int("num_layers", num_layers, 1)
    _check_int("shallow_layers", shallow, 0)
    _check_int("deep_layers", deep, 0)
    _check_int("window_size", size, 1)
    _check_int("stride", stride, 1)
    if stride > size:
        raise ValueError(f"stride ({stride}) larger than window_size ({size}) would skip layers")
    n = num_layers
    while shallow + deep + 1 > n and (shallow > 1 or deep > 1):
        if shallow >= deep:
            shallow -= 1
        else:
            deep -= 1

    windows: list[Window] = [tuple(range(k + 1)) for k in range(min(shallow, n))]
    middle_start = max(shallow - 1, 0)
    middle_end = n - deep if deep > 0 else n - 1      # last layer the intermediate phase covers
    middle_end = max(middle_end, middle_start)
    a = middle_start
    while True:
        windows.append(tuple(range(a, min(a + size, middle_end + 1))))
        if a + size - 1 >= middle_end:
            break
        a += stride
    windows += [tuple(range(n - deep + j, n)) for j in range(min(deep, n))]
    return _dedupe(windows)


def single_layer_windows(num_layers: int) -> list[Window]:
    """OmniQuant's schedule: one window per layer."""
    _check_int("num_layers", num_layers, 1)
    return [(i,) for i in range(num_layers)]


def explicit_windows(windows, num_layers: int) -> list[Window]:
    """Validate a user-given schedule: windows of consecutive in-range layers, covering every layer,
    with non-decreasing start (the inputs only move forward)."""
    _check_int("num_layers", num_layers, 1)
    out: list[Window] = []
    for w in windows:
        w = tuple(int(i) for i in w)
        if not w:
            raise ValueError("windows: an empty window")
        if list(w) != list(range(w[0], w[0] + len(w))):
            raise ValueError(f"windows: {list(w)} is not a run of consecutive layers")
        if w[0] < 0 or w[-1] >= num_layers:
            raise ValueError(f"windows: {list(w)} lies outside layers 0..{num_layers - 1}")
        if out and w[0] < out[-1][0]:
            raise ValueError(f"windows: {list(w)} starts before the previous window {list(out[-1])}")
        out.append(w)
    missing = sorted(set(range(num_layers)) - {i for w in out for i in w})
    if missing:
        raise ValueError(f"windows: layers {missing} are in no window")
    return out


def format_windows(windows: list[Window]) -> str:
    return " ".join("[" + ",".join(str(i) for i in w) + "]" for w in windows)


def _dedupe(windows: list[Window]) -> list[Window]:
    seen: set[Window] = set()
    out = []
    for w in windows:
        if w and w not in seen:
            seen.add(w)
            out.append(w)
    return out


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
