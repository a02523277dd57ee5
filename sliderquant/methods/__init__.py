"""The registry of quantization methods: each one's facts and its single entry point.

Nothing outside this module compares method names: callers look a method up with
``get_method(cfg.method)`` and ask it (``needs_calibration``, ``trains_windows``,
``window_plan(cfg, num_layers)``) or call it (``method.run(model, cfg, calibration, work_dir=...,
on_window=...)``).  The entry points are imported on first use, so this module imports nothing of
ours and the config can validate names against it without a cycle.

The modules beside it: ``common`` (wrapping a model's linears, running its layers, collecting the
codes), ``rtn``, ``gptq`` (the solver and its layer-by-layer driver), ``windows`` (SliderQuant and
OmniQuant: block reconstruction over windows of layers).
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
    plan: str = ""                # windows methods: "module:function", f(cfg, num_layers) -> WindowPlan

    def run(self, model, cfg, calibration=None, work_dir=None, on_window=None):
        return _resolve(self.entry)(model, cfg, calibration, work_dir, on_window)

    def window_plan(self, cfg, num_layers: int):
        """``WindowPlan(windows, rates, lora_rank, epochs)`` of a windows method."""
        if not self.plan:
            raise ValueError(f"method {self.name!r} does not train over windows and has no window schedule")
        return _resolve(self.plan)(cfg, num_layers)


def _resolve(entry: str):
    module, _, func = entry.partition(":")
    return getattr(importlib.import_module(module), func)


_WINDOWS = "sliderquant.methods.windows"
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("sliderquant", True, True, f"{_WINDOWS}:run_windows",
           "sliding windows, incremental stages, LWC + LoRA (the paper's method)",
           plan=f"{_WINDOWS}:sliderquant_plan"),
    Method("omniquant", True, True, f"{_WINDOWS}:run_windows",
           "one-layer windows, one stage, LWC only", plan=f"{_WINDOWS}:omniquant_plan"),
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
