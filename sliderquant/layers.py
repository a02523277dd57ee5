"""``QuantLinear``: an ``nn.Linear`` whose weight is fake-quantized with learnable parameters.

``W_q = Q(W * alpha + s B A)`` with learnable clipping logits (LWC), low-rank factors ``A`` (r x in)
and ``B`` (out x r), an optional per-input-channel scale ``alpha`` and an optional rounding offset
``V`` (out x in, codes ``round(W_t / s + V)``, kept in [-0.5, 0.5] by ``project_``); the input is
divided by ``alpha`` (and fake-quantized per token when ``abits < 16``).  The original weight is frozen; the
learnable tensors are fp32 whatever the weight's dtype.  ``finalize`` folds everything into the
weight and keeps the integer codes, scales and zero points.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .quantizer import LWC_LINEAR_MIN, ROUND_OFFSET_BOUND, dequantize, layer_group_size, lwc_params, round_offsets

_LEARNED = ("lwc_upper", "lwc_lower", "lora_a", "lora_b", "channel_scale", "round_offset")


class QuantLinear(nn.Module):
    def __init__(self, linear: nn.Linear, wbits: int, group_size: int | None = None,
                 symmetric: bool = False, abits: int = 16, lora_rank: int = 0,
                 lwc: bool = True, channel_scale: bool = False, lora_scaling: float = 1.0,
                 generator: torch.Generator | None = None, round_offset: bool = False,
                 lwc_param: str = "sigmoid", lwc_init: str = "none", input_sq: torch.Tensor | None = None):
        super().__init__()
        out_f, in_f = linear.weight.shape
        self.in_features, self.out_features = in_f, out_f
        self.wbits, self.abits, self.symmetric = wbits, abits, symmetric
        self.group_size = layer_group_size(in_f, group_size)
        self.lora_scaling = lora_scaling
        self.weight = linear.weight
        self.weight.requires_grad_(False)
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.lwc_param = lwc_param      # "sigmoid": the LWC parameters are logits; "linear": the factors
        if lwc:
            self.lwc_upper, self.lwc_lower = lwc_params(linear.weight, self.group_size, wbits, symmetric,
                                                        lwc_param, lwc_init, input_sq)
        else:
            self.lwc_upper = self.lwc_lower = None
        if lora_rank > 0:
            a = torch.empty(lora_rank, in_f, dtype=torch.float32)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            self.lora_a = nn.Parameter(a)
            self.lora_b = nn.Parameter(torch.zeros(out_f, lora_rank, dtype=torch.float32))
        else:
            self.lora_a = self.lora_b = None
        self.channel_scale = nn.Parameter(torch.ones(in_f, dtype=torch.float32)) if channel_scale else None
        self.round_offset = round_offsets(out_f, in_f) if round_offset else None
        self.quant_rate = 1.0
        self.quantize = True          # False: behave as the full-precision linear (teacher)
        self.finalized = False

    # ---- learnable parameters by optimizer group -------------------------------------------------
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = {"lwc": [self.lwc_upper, self.lwc_lower], "lora": [self.lora_a, self.lora_b],
                  "scale": [self.channel_scale], "round": [self.round_offset]}
        return {k: [p for p in v if p is not None] for k, v in groups.items()}

    def learned_state(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self._named_learned().items()}

    def load_learned_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, p in self._named_learned().items():
                p.copy_(state[k])

    def _named_learned(self) -> dict[str, nn.Parameter]:
        return {n: getattr(self, n) for n in _LEARNED if getattr(self, n) is not None}

    @torch.no_grad()
    def project_(self) -> None:
        """Bring the parameters back into their domain after an optimizer step: V to [-0.5, 0.5]
        (a layer is trained in several windows and stages, so the schedule alone does not bound it),
        linear LWC factors to [0.5, 1]."""
        if self.lwc_param == "linear" and self.lwc_upper is not None:
            self.lwc_upper.clamp_(LWC_LINEAR_MIN, 1.0)
            self.lwc_lower.clamp_(LWC_LINEAR_MIN, 1.0)
        if self.round_offset is not None:
            self.round_offset.clamp_(-ROUND_OFFSET_BOUND, ROUND_OFFSET_BOUND)

    # ---- forward ----------------------------------------------------------------------------------
    def _qargs(self) -> dict:
        return dict(bits=self.wbits, group_size=self.group_size, symmetric=self.symmetric,
                    lwc_upper=self.lwc_upper, lwc_lower=self.lwc_lower,
                    channel_scale=self.channel_scale, lora_a=self.lora_a, lora_b=self.lora_b,
                    lora_scaling=self.lora_scaling, round_offset=self.round_offset, lwc_param=self.lwc_param)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.finalized or not self.quantize:
            return F.linear(x, self.weight, self.bias)
        # the dtype the matmul runs in: under autocast the fake-quantized weight is produced in the
        # autocast dtype directly (no fp32 copy to cast, and a bf16 gradient read as it comes)
        dev = x.device.type
        mm_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        out_dtype = mm_dtype if mm_dtype in (torch.float32, torch.bfloat16) else None
        w = ops.fake_quant_weight(self.weight, **self._qargs(), quant_rate=self.quant_rate, out_dtype=out_dtype)
        if self.abits < 16:
            x = ops.fake_quant_act(x, self.abits, channel_scale=self.channel_scale,
                                   quant_rate=self.quant_rate)
        elif self.channel_scale is not None:
            x = (x.float() / self.channel_scale).to(x.dtype)
        return F.linear(x, w.to(mm_dtype), None if self.bias is None else self.bias.to(mm_dtype))

    # ---- deployment -------------------------------------------------------------------------------
    @torch.no_grad()
    def finalize(self) -> None:
        """Fold LoRA, clipping and the rounding offset into the weight: keep codes/scale/zero, set the weight to
        ``(q - zero) * scale``.  Channel scales must have been folded into the producer first
        (weight-activation mode); in weight-only mode they are refused here."""
        if self.finalized:
            return
        if self.channel_scale is not None and not torch.all(self.channel_scale == 1):
            raise RuntimeError("QuantLinear.finalize: channel scales are not folded into the producer "
                               "(weight-activation mode is not implemented yet)")
        self.set_quantized(*ops.weight_qparams(self.weight, **self._qargs()))

    @torch.no_grad()
    def set_quantized(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                      w_hat: torch.Tensor | None = None) -> None:
        """Store codes (out, in), scales and zeros (out, n_groups); the weight becomes ``w_hat``,
        by default ``(q - zero) * scale``."""
        self.register_buffer("qweight", q.to(torch.int16))
        self.register_buffer("scales", scale.float().reshape(self.out_features, -1))
        self.register_buffer("zeros", zero.float().reshape(self.out_features, -1))
        if w_hat is None:
            w_hat = dequantize(self.qweight, self.scales, self.zeros)
        self.weight.copy_(w_hat.to(self.weight.dtype))
        for n in _LEARNED:
            setattr(self, n, None)
        self.finalized = True

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the (finalized) weight and bias, for saving/inference."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device="meta")
        lin.weight = self.weight
        lin.bias = self.bias
        return lin

    def extra_repr(self) -> str:
        g = "channel" if self.group_size is None else f"g{self.group_size}"
        return (f"{self.in_features}->{self.out_features}, w{self.wbits}a{self.abits} {g}, "
                f"lora={0 if self.lora_a is None else self.lora_a.shape[0]}, rate={self.quant_rate}")
