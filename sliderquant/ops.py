"""Autograd-aware quantization ops (placeholder: pure-torch path until the C core lands)."""
from .reference import fake_quant_act, fake_quant_weight, quantized_prefix, weight_qparams  # noqa: F401


def backend() -> str:
    return "torch"
