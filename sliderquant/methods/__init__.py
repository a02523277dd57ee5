"""The registry of quantization methods: each one's facts and its single entry point.

Nothing outside this module compares method names: callers look a method up with
``get_method(cfg.method)`` and ask it (``needs_calibration``, ``trains_windows``) or call it
(``method.run(model, cfg, calibration, work_dir=..., on_window=...)``).  The entry points are
imported on first use, so this module imports nothing of ours and the config can validate names
against it without a cycle.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    needs_calibration: bool       # calibration token ids are required
    trains_windows: bool          # learns parameters over windows: autocast and work_dir apply
    entry: str                    # "module:function", called as f(model, cfg, calibration, work_dir, on_window)
    summary: str = ""

    def run(self, model, cfg, calibration=None, work_dir=None, on_window=None):
        module, _, func = self.entry.partition(":")
        return getattr(importlib.import_module(module), func)(model, cfg, calibration, work_dir, on_window)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("sliderquant", True, True, "sliderquant.engine:run_windows_method",
           "sliding windows, incremental stages, LWC + LoRA (the paper's method)"),
    Method("omniquant", True, True, "sliderquant.engine:run_windows_method",
           "one-layer windows, one stage, LWC only"),
    Method("gptq", True, False, "sliderquant.methods.gptq:run_gptq",
           "Hessian-based column-by-column rounding"),
    Method("rtn", False, False, "sliderquant.methods.rtn:run_rtn",
           "round-to-nearest on the min-max grid, no calibration"),
)}


def get_method(name) -> Method:
    """The registered method ``name``; ``ValueError`` naming the known ones otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {name!r}") from None
