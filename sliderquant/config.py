"""``QuantConfig``: every setting of a quantization run, readable from YAML.

Learning rates are given per sample, as in the authors' configs: the optimizer uses
``lr * batch_size`` for every parameter group (their code multiplies each group's learning rate by
the mini-batch size), unless ``scale_lr_by_batch`` is false.

The YAML may use our names or the authors' ones (deep-optimization/SliderQuant, ``main.py``):

=================  ===========================================================================
authors' key       meaning here
=================  ===========================================================================
wbits, abits       weight bits (2 to 8) / activation bits (only 16 = not quantized, for now)
group_size         weight group size; null = per output channel
epochs             total epochs, split evenly between the stages (their ``epochs // quant_step``)
nsamples           calibration sequences
batch_size         mini-batch size (and the learning-rate multiplier)
num_layer          size of the intermediate sliding window (``window_size``)
sliding_layer      stride of the intermediate window (``stride``); null = ``num_layer``
fill_window_size   length of both the PESW and the PCSW phase (``shallow_layers = deep_layers``)
lora_rank          rank r of the low-rank refinement (the update ``B A`` is scaled by
                   ``lora_alpha / r``; their layers use alpha = 1, so 1/r)
quant_step         number of intra-layer stages S; ratios ``k / S`` for k = 1..S
quant_rate         the current stage's ratio in their code, overwritten by the stage list
                   derived from ``quant_step``; accepted, must lie in (0, 1], has no effect
lwc_lr, lora_lr,   per-sample learning rates of the clipping logits, the LoRA factors and the
scale_lr           channel scales (0 turns a group off; only 0 is accepted for now)
=================  ===========================================================================
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field

from .limits import FULL_PRECISION_BITS, check_bits, check_group_size
from .methods import METHODS

# Authors' keys whose meaning is a plain rename.
_AUTHOR_RENAMES = {"num_layer": "window_size", "sliding_layer": "stride"}
# Authors' keys that are accepted but carry no setting of ours.
_AUTHOR_IGNORED = ("quant_rate",)


@dataclass
class QuantConfig:
    method: str = "sliderquant"
    wbits: int = 4
    abits: int = 16
    group_size: int | None = None
    symmetric: bool = False
    # calibration
    calib: str = "c4"                # c4 | wikitext2 | a text file | sample (from the fp model)
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 2
    # optimisation
    epochs: int = 60
    batch_size: int = 3
    lwc_lr: float = 0.01
    lora_lr: float = 5e-4
    scale_lr: float = 0.0
    scale_lr_by_batch: bool = True
    lora_rank: int = 4
    lora_alpha: float = 1.0          # LoRA scaling = lora_alpha / lora_rank (authors: alpha 1)
    autocast: str = "auto"           # auto: bf16 on CUDA and on CPUs with native bf16 (AMX/AVX512-BF16), else fp32
    # schedule
    shallow_layers: int = 4
    deep_layers: int = 4
    window_size: int = 2
    stride: int = 1
    windows: list[list[int]] | None = None
    quant_rates: list[float] = field(default_factory=lambda: [0.5, 1.0])
    # gptq
    gptq_damp: float = 0.01
    gptq_act_order: bool = False
    gptq_block_size: int = 128
    # not in the method or the authors' code: undo a window whose training ends above its starting loss
    revert_worse_windows: bool = False
    # small-budget options (docs/algorithm.md section 11); the defaults are the paper's method
    round_lr: float = 0.0            # per-sample lr of the rounding offset V; 0 = no V
    lwc_param: str = "sigmoid"       # sigmoid: LWC logits (the paper); linear: the clipping factors, in [0.5, 1]
    lwc_init: str = "none"           # none: logit 4.0 / factor 1.0; search: per-group weight-error grid search;
                                     # search_act: the same, each column's error weighed by its input's mean square
    lwc_opt: str = "adamw"           # optimizer of the LWC parameters: adamw | sign (p -= lr * sign(grad))
    round_opt: str = "adamw"         # optimizer of V: adamw | sign
    window_loss_samples: int = 0     # loss_before/after of a window on its first N samples; 0 = all of them
    epochs_per_stage: list[int] | None = None   # epochs of each stage (summing to epochs); None: split evenly

    def __post_init__(self) -> None:
        self.validate()

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict) -> "QuantConfig":
        if not isinstance(data, dict):
            raise ValueError(f"a config must be a mapping of keys to values, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict = {}
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key in _AUTHOR_RENAMES:
                if key == "sliding_layer" and value is None:
                    continue
                kwargs[_AUTHOR_RENAMES[key]] = value
            elif key == "fill_window_size":
                kwargs["shallow_layers"] = kwargs["deep_layers"] = 0 if value is None else value
            elif key == "quant_step":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"quant_step must be an integer >= 1, got {value!r}")
                kwargs["quant_rates"] = [k / value for k in range(1, value + 1)]
            elif key in _AUTHOR_IGNORED:
                if not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                    raise ValueError(f"quant_rate must lie in (0, 1], got {value!r}")
            else:
                raise ValueError(f"unknown config key {key!r}; known keys: {', '.join(sorted(known))} "
                                 f"(and the authors' {', '.join(_author_keys())})")
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path) -> "QuantConfig":
        import yaml
        with open(path, encoding="utf-8") as f:
            try:
                data = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise ValueError(f"{path}: not valid YAML ({e})") from None
        try:
            return cls.from_dict(data or {})
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def replace(self, **changes) -> "QuantConfig":
        data = self.to_dict()
        data.update({k: v for k, v in changes.items() if v is not None})
        return QuantConfig.from_dict(data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of the settings that change the result (used to guard resume directories)."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    # ---- derived values -------------------------------------------------------------------
    def optimizer_lrs(self) -> dict[str, float]:
        factor = self.batch_size if self.scale_lr_by_batch else 1
        return {"lwc": self.lwc_lr * factor, "lora": self.lora_lr * factor,
                "scale": self.scale_lr * factor, "round": self.round_lr * factor}

    def optimizer_kinds(self) -> dict[str, str]:
        """The optimizer of each parameter group: ``adamw`` or ``sign``; LoRA and channel scales use AdamW."""
        return {"lwc": self.lwc_opt, "lora": "adamw", "scale": "adamw", "round": self.round_opt}

    def stage_epochs(self) -> int:
        """Epochs per stage: the total split evenly (at least one unless ``epochs`` is 0)."""
        return 0 if self.epochs == 0 else max(1, self.epochs // len(self.quant_rates))

    def epochs_of_stages(self) -> list[int]:
        """The epochs of each stage: ``epochs_per_stage`` when given, else ``stage_epochs()`` each."""
        if self.epochs_per_stage is not None:
            return list(self.epochs_per_stage)
        return [self.stage_epochs()] * len(self.quant_rates)

    # ---- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        check_bits(self.wbits, "wbits")
        check_group_size(self.group_size, name="group_size")
        # Weight-activation quantization is not wired end to end (the saved and evaluated model
        # would run its activations in full precision, and channel scales cannot be folded yet):
        # refuse it here, before any calibration, rather than report a W4A4 that is not one.
        if isinstance(self.abits, bool) or self.abits != FULL_PRECISION_BITS:
            raise ValueError(f"abits must be {FULL_PRECISION_BITS} (activations in full precision), got "
                             f"{self.abits!r}: weight-activation quantization (abits < 16) is not "
                             f"implemented end to end yet; use abits: {FULL_PRECISION_BITS}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be true or false, got {self.symmetric!r}")
        if not isinstance(self.calib, str) or not self.calib:
            raise ValueError(f"calib must be 'c4', 'wikitext2' or a file path, got {self.calib!r}")
        _int("nsamples", self.nsamples, 1)
        _int("seqlen", self.seqlen, 1)
        _int("seed", self.seed, 0)
        _int("epochs", self.epochs, 0)
        _int("batch_size", self.batch_size, 1)
        for name in ("lwc_lr", "lora_lr", "scale_lr", "gptq_damp", "lora_alpha", "round_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.scale_lr != 0:
            raise ValueError(f"scale_lr must be 0, got {self.scale_lr!r}: learnable channel scales need "
                             f"folding into the producing layer, which is not implemented yet; "
                             f"use scale_lr: 0")
        _int("lora_rank", self.lora_rank, 0)
        if self.autocast not in ("auto", "bf16", "fp32"):
            raise ValueError(f"autocast must be auto, bf16 or fp32, got {self.autocast!r}")
        _int("shallow_layers", self.shallow_layers, 0)
        _int("deep_layers", self.deep_layers, 0)
        _int("window_size", self.window_size, 1)
        _int("stride", self.stride, 1)
        if self.stride > self.window_size:
            raise ValueError(f"stride ({self.stride}) must not exceed window_size ({self.window_size})")
        if self.windows is not None:
            if not isinstance(self.windows, list) or not all(
                    isinstance(w, (list, tuple)) and w and all(isinstance(i, int) for i in w)
                    for w in self.windows):
                raise ValueError(f"windows must be a list of lists of layer indices, got {self.windows!r}")
            self.windows = [list(w) for w in self.windows]
        rates = self.quant_rates
        if not isinstance(rates, (list, tuple)) or not rates or not all(
                isinstance(r, (int, float)) and not isinstance(r, bool) and 0.0 < r <= 1.0 for r in rates):
            raise ValueError(f"quant_rates must be a non-empty list of ratios in (0, 1], got {rates!r}")
        self.quant_rates = [float(r) for r in rates]
        if self.quant_rates[-1] != 1.0:
            raise ValueError(f"quant_rates must end with 1.0 (the last stage quantizes everything), got {rates}")
        if any(b < a for a, b in zip(self.quant_rates, self.quant_rates[1:])):
            raise ValueError(f"quant_rates must be non-decreasing, got {rates}")
        _int("gptq_block_size", self.gptq_block_size, 1)
        if not isinstance(self.gptq_act_order, bool):
            raise ValueError(f"gptq_act_order must be true or false, got {self.gptq_act_order!r}")
        if not isinstance(self.scale_lr_by_batch, bool):
            raise ValueError(f"scale_lr_by_batch must be true or false, got {self.scale_lr_by_batch!r}")
        self._validate_small_budget()

    def _validate_small_budget(self) -> None:
        """The options of docs/algorithm.md section 11 act on the trained windows only: a method that
        trains none (rtn, gptq) refuses them rather than ignore them."""
        if self.lwc_param not in ("sigmoid", "linear"):
            raise ValueError(f"lwc_param must be sigmoid or linear, got {self.lwc_param!r}")
        if self.lwc_init not in ("none", "search", "search_act"):
            raise ValueError(f"lwc_init must be none, search or search_act, got {self.lwc_init!r}")
        for name in ("lwc_opt", "round_opt"):
            if getattr(self, name) not in ("adamw", "sign"):
                raise ValueError(f"{name} must be adamw or sign, got {getattr(self, name)!r}")
        _int("window_loss_samples", self.window_loss_samples, 0)
        if self.epochs_per_stage is not None:
            eps = self.epochs_per_stage
            if not isinstance(eps, (list, tuple)) or not all(
                    isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in eps):
                raise ValueError(f"epochs_per_stage must be a list of integers >= 0, got {eps!r}")
            if len(eps) != len(self.quant_rates):
                raise ValueError(f"epochs_per_stage has {len(eps)} entries but there are {len(self.quant_rates)} "
                                 f"stages (quant_rates {self.quant_rates})")
            if sum(eps) != self.epochs:
                raise ValueError(f"epochs_per_stage {list(eps)} sums to {sum(eps)}, but epochs is {self.epochs}: "
                                 f"set epochs to the total")
            if self.method != "sliderquant":
                raise ValueError(f"epochs_per_stage splits sliderquant's stages; {self.method} has none to split")
            self.epochs_per_stage = list(eps)
        if self.round_opt != "adamw" and self.round_lr == 0:
            raise ValueError(f"round_opt: {self.round_opt} has no effect with round_lr: 0 (no rounding offset); "
                             f"set round_lr > 0 or leave round_opt at adamw")
        changed = [f"{name}: {getattr(self, name)!r}" for name, default in _SMALL_BUDGET_DEFAULTS.items()
                   if getattr(self, name) != default]
        if changed and not METHODS[self.method].trains_windows:
            raise ValueError(f"{', '.join(changed)} only act on methods that train windows (sliderquant, "
                             f"omniquant), not on {self.method}; leave them at their defaults")


# the small-budget options and their defaults (the paper's method)
_SMALL_BUDGET_DEFAULTS = {"round_lr": 0.0, "lwc_param": "sigmoid", "lwc_init": "none", "lwc_opt": "adamw",
                          "round_opt": "adamw", "window_loss_samples": 0, "epochs_per_stage": None}


def _int(name: str, value, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (
            maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")


def _author_keys() -> list[str]:
    return sorted([*_AUTHOR_RENAMES, "fill_window_size", "quant_step", *_AUTHOR_IGNORED])
