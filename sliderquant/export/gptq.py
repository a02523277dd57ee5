"""Export to GPTQ (read by transformers + optimum + gptqmodel; vLLM for symmetric 4/8-bit).

Per quantized linear ``<m>`` (b bits, n_groups groups of g input columns):
    <m>.qweight  int32 (in*b/32, out)        codes, one LSB-first bit stream down each column
    <m>.qzeros   int32 (n_groups, out*b/32)  zero points, the same stream along out
    <m>.scales   float16 (n_groups, out)     s
    <m>.g_idx    int32 (in,)                 group of each input column, i // g
and W[o, i] = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o]).

Two checkpoint formats exist: ``gptq`` (v1) stores z - 1 in each zero field, and readers turn it
into v2 by adding 1 to every field with carries, so v1 cannot hold z = 0 (frequent in asymmetric
grids).  Asymmetric exports are therefore always written as ``gptq_v2`` (fields hold z); symmetric
ones as ``gptq`` v1 (z = 2^(b-1) >= 1 for every group; v1 is the format most engines read).

What GPTQ cannot hold is refused before anything is written: bits other than 2/3/4/8, several
group sizes in one model (the config has one), layers whose width is not a whole number of words
(in*b and out*b multiples of 32; readers unpack whole words), and zero points outside [0, 2^b-1].
Scales are stored as fp16 (the format's dtype): the export equals the fake-quantized model with its
scales rounded to fp16; the largest relative rounding is recorded in the provenance.
"""

from __future__ import annotations

import torch
from torch import nn

from .grid import group_sizes, quantized_layers, require_integer_zeros
from .hf_dir import check_target, dense_tensors, write_hf_dir
from .packing import WORD_BITS, pack_columns, pack_rows
from .provenance import provenance

FORMAT = "gptq"
BITS = (2, 3, 4, 8)


def export_gptq(model: nn.Module, out_dir, tokenizer=None) -> str:
    check_target(out_dir)
    cfg, layers = quantized_layers(model)
    check_layers(layers, FORMAT, BITS)
    bits, symmetric = layers[0].bits, layers[0].symmetric
    checkpoint_format = "gptq" if symmetric else "gptq_v2"
    # v1 stores z - 1; symmetric zero points are 2^(b-1), never 0
    zero_shift = 1 if checkpoint_format == "gptq" else 0
    tensors = dense_tensors(model, {layer.name for layer in layers})
    for layer in layers:
        g = layer.group_size or layer.in_features
        tensors[f"{layer.name}.qweight"] = pack_columns(layer.codes.t(), bits)
        tensors[f"{layer.name}.qzeros"] = pack_rows(layer.zeros.t().to(torch.int64) - zero_shift, bits)
        tensors[f"{layer.name}.scales"] = layer.scales.t().to(torch.float16).contiguous()
        tensors[f"{layer.name}.g_idx"] = (torch.arange(layer.in_features) // g).to(torch.int32)
    group_size = layers[0].group_size or -1
    from .. import __version__
    qc = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": False,
          "sym": symmetric, "true_sequential": True, "checkpoint_format": checkpoint_format,
          "format": checkpoint_format, "lm_head": False,
          "meta": {"quantizer": [f"sliderquant:{__version__}"], "method": cfg.get("method")}}
    details = {"checkpoint_format": checkpoint_format, "scale_dtype": "float16",
               "scale_fp16_max_rel_error": fp16_rounding(layers)}
    return write_hf_dir(model, out_dir, tensors, qc, provenance(model, cfg, FORMAT, **details), tokenizer,
                        extra_json={"quantize_config.json": {**qc, "pack_dtype": "int32"}})


def check_layers(layers, fmt: str, bits_allowed) -> None:
    """The checks GPTQ and AWQ share: bit width, one group size, whole words, integer zeros."""
    bits = layers[0].bits
    if bits not in bits_allowed:
        raise ValueError(f"export to {fmt}: {bits}-bit codes cannot be stored ({fmt} holds "
                         f"{', '.join(map(str, bits_allowed))} bits); export to 'compressed-tensors' "
                         f"(2-8 bits) instead")
    by_size = group_sizes(layers)
    if len(by_size) > 1:
        parts = "; ".join(f"{'per channel' if g is None else f'g{g}'}: {len(names)} layers, e.g. {names[0]}"
                          for g, names in by_size.items())
        raise ValueError(f"export to {fmt}: the format has one group size per model, this one has "
                         f"{len(by_size)} ({parts}). Quantize with a group size that divides every "
                         f"layer's input width (e.g. group_size: 64 or 32 for SmolLM2), or per channel")
    ragged = [f"{layer.name} ({layer.out_features}x{layer.in_features})" for layer in layers
              if (layer.in_features * bits) % WORD_BITS or (layer.out_features * bits) % WORD_BITS]
    if ragged:
        raise ValueError(f"export to {fmt}: {len(ragged)} layers are not a whole number of 32-bit words "
                         f"wide at {bits} bits (both dimensions times bits must be multiples of 32): "
                         f"{', '.join(ragged[:6])}{' ...' if len(ragged) > 6 else ''}; export this model "
                         f"to 'compressed-tensors' instead")
    require_integer_zeros(layers, fmt)


def fp16_rounding(layers) -> float:
    """Largest relative change of a scale rounded to fp16."""
    worst = 0.0
    for layer in layers:
        s = layer.scales
        worst = max(worst, float(((s.to(torch.float16).float() - s).abs() / s).max()))
    return worst
