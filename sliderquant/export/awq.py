"""Export to AWQ ``gemm`` (4-bit asymmetric; read by transformers through gptqmodel, vLLM, AutoAWQ).

Per quantized linear ``<m>`` (n_groups groups of g input columns):
    <m>.qweight  int32 (in, out/8)          8 codes per word, packed along out
    <m>.qzeros   int32 (n_groups, out/8)    zero points, same words, z itself (no v1-style z - 1)
    <m>.scales   float16 (n_groups, out)    s
Within a word, nibble k (bits 4k..4k+3) of word c holds output column 8c + ORDER[k] with
ORDER = (0, 2, 4, 6, 1, 3, 5, 7): AWQ's interleave, made for its GPU kernel's unpacking.
Dequantization is (q - z) * s, our grid; scales are fp16 as in GPTQ.

AWQ is a 4-bit asymmetric format: other widths, symmetric grids, several group sizes, output
widths not a multiple of 8 and zero points outside [0, 15] are refused before anything is written.
"""

from __future__ import annotations

import torch
from torch import nn

from .gptq import check_layers, fp16_rounding
from .grid import quantized_layers
from .hf_dir import check_target, dense_tensors, write_hf_dir
from .packing import pack_rows
from .provenance import provenance

FORMAT = "awq"
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def interleave(x: torch.Tensor) -> torch.Tensor:
    """Reorder the columns of ``x`` (rows, out) so that packing 8 at a time gives AWQ's words."""
    rows, out = x.shape
    return x.reshape(rows, out // 8, 8)[:, :, list(ORDER)].reshape(rows, out)


def export_awq(model: nn.Module, out_dir, tokenizer=None) -> str:
    check_target(out_dir)
    cfg, layers = quantized_layers(model)
    if layers[0].symmetric:
        raise ValueError("export to awq: AWQ stores asymmetric 4-bit grids (zero_point: true); this model "
                         "is quantized symmetrically: export it to 'gptq' or 'compressed-tensors'")
    if layers[0].group_size is None:
        raise ValueError("export to awq: AWQ needs grouped quantization (q_group_size); this model is "
                         "quantized per channel: quantize with a group size (e.g. 64 or 128) or export "
                         "to 'gptq' or 'compressed-tensors'")
    check_layers(layers, FORMAT, (4,))
    tensors = dense_tensors(model, {layer.name for layer in layers})
    for layer in layers:
        tensors[f"{layer.name}.qweight"] = pack_rows(interleave(layer.codes.t()), 4)
        tensors[f"{layer.name}.qzeros"] = pack_rows(interleave(layer.zeros.t().to(torch.int64)), 4)
        tensors[f"{layer.name}.scales"] = layer.scales.t().to(torch.float16).contiguous()
    quantized = {layer.name for layer in layers}
    dense = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized)
    g = layers[0].group_size
    qc = {"quant_method": "awq", "bits": 4, "group_size": g, "zero_point": True, "version": "gemm",
          "modules_to_not_convert": dense or None}
    details = {"scale_dtype": "float16", "scale_fp16_max_rel_error": fp16_rounding(layers)}
    autoawq = {"zero_point": True, "q_group_size": g, "w_bit": 4, "version": "GEMM",
               "modules_to_not_convert": dense or None}
    return write_hf_dir(model, out_dir, tensors, qc, provenance(model, cfg, FORMAT, **details), tokenizer,
                        extra_json={"quant_config.json": autoawq})
