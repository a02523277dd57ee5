"""The quantized linears of a model as the export formats see them.

``model.sliderquant_state`` keeps, per quantized linear, int16 codes q (out, in) and fp32 scales s
and zero points z (out, n_groups) with weight = (q - z) * s.  Every format stores *unsigned* b-bit
fields, so symmetric grids (q in [-2^(b-1), 2^(b-1)-1], z = 0) are shifted by 2^(b-1) on both q and
z, which leaves (q - z) * s unchanged.  Formats with integer zero points also need z to be an
integer in [0, 2^b - 1]; ours is not clamped (a group whose clipped range excludes 0 has z outside
the code range), so ``require_integer_zeros`` checks it and names the modules that break it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class QLayer:
    name: str
    module: nn.Linear
    bits: int
    symmetric: bool
    group_size: int | None        # columns per group; None = one group per row (per channel)
    codes: torch.Tensor           # int64 (out, in), unsigned: in [0, 2^bits - 1]
    scales: torch.Tensor          # float32 (out, n_groups)
    zeros: torch.Tensor           # float32 (out, n_groups), shifted like the codes

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]


def quantized_layers(model: nn.Module) -> tuple[dict, list[QLayer]]:
    """``(config dict, [QLayer, ...])`` of a model quantized by ``sliderquant.quantize``.

    Checks that every stored module exists, has the codes' shape, and that its weight still equals
    its dequantized codes (what the exported file will compute), so an export is the model the
    user evaluated, not something edited after quantization.
    """
    from ..quantizer import dequantize
    state = getattr(model, "sliderquant_state", None)
    if not isinstance(state, dict) or "config" not in state or "tensors" not in state:
        raise ValueError("export: this model carries no sliderquant quantization state; call "
                         "sliderquant.quantize(model, ...) or load a directory written by sliderquant.save")
    cfg, tensors = state["config"], state["tensors"]
    bits, symmetric = int(cfg["wbits"]), bool(cfg.get("symmetric", False))
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    if not names:
        raise ValueError("export: the model's sliderquant state holds no quantized linears")
    offset = 1 << (bits - 1) if symmetric else 0
    layers = []
    for name in names:
        try:
            q, s, z = (tensors[f"{name}.{p}"] for p in ("qweight", "scales", "zeros"))
        except KeyError as e:
            raise ValueError(f"export: the sliderquant state lacks {e.args[0]}; it is incomplete") from None
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"export: the sliderquant state names {name}, which is not a module of "
                             f"this model") from None
        weight = getattr(module, "weight", None)
        if not isinstance(module, nn.Linear) or weight is None or tuple(weight.shape) != tuple(q.shape):
            raise ValueError(f"export: {name} is not a linear of shape {tuple(q.shape)} as its codes say")
        if s.shape != z.shape or s.shape[0] != q.shape[0] or q.shape[1] % s.shape[1]:
            raise ValueError(f"export: {name}: scales {tuple(s.shape)} / zeros {tuple(z.shape)} do not fit "
                             f"codes {tuple(q.shape)}")
        if not torch.equal(dequantize(q, s, z).to(weight.dtype), weight.detach().cpu()):
            raise ValueError(f"export: the weight of {name} no longer equals its quantized codes (was the "
                             f"model changed after quantize?); quantize again before exporting")
        codes = q.to(torch.int64) + offset
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
            raise ValueError(f"export: {name} has codes outside the {bits}-bit "
                             f"{'symmetric' if symmetric else 'asymmetric'} range")
        groups = s.shape[1]
        layers.append(QLayer(name, module, bits, symmetric, None if groups == 1 else q.shape[1] // groups,
                             codes, s.float(), z.float() + offset))
    return cfg, layers


def require_integer_zeros(layers: list[QLayer], fmt: str) -> None:
    """Refuse (naming modules and counts) zero points a ``bits``-bit integer field cannot hold."""
    bad = []
    for layer in layers:
        z = layer.zeros
        outside = (z != torch.round(z)) | (z < 0) | (z > (1 << layer.bits) - 1)
        if bool(outside.any()):
            bad.append(f"{layer.name}: {int(outside.sum())}")
    if bad:
        b = layers[0].bits
        shown = ", ".join(bad[:8]) + (f", ... ({len(bad)} modules)" if len(bad) > 8 else "")
        raise ValueError(f"export to {fmt}: the format stores zero points as {b}-bit integers in "
                         f"[0, {(1 << b) - 1}], but some groups' zero points lie outside that range "
                         f"(their clipped range excludes 0): {shown}. Export to 'gguf' (its float minimum "
                         f"holds them) or quantize with symmetric: true")


def group_sizes(layers: list[QLayer]) -> dict[int | None, list[str]]:
    """Group size (None = per channel) -> names of the layers using it."""
    out: dict[int | None, list[str]] = {}
    for layer in layers:
        out.setdefault(layer.group_size, []).append(layer.name)
    return out
