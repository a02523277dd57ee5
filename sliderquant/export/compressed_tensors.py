"""Export to compressed-tensors ``pack-quantized`` (read by transformers + compressed-tensors, vLLM).

Per quantized linear ``<m>``:
    <m>.weight_packed       int32 (out, ceil(in*b/32))   codes, one LSB-first bit stream per row
    <m>.weight_scale        float32 (out, n_groups)      s (per channel: (out, 1)); kept fp32, exact
    <m>.weight_zero_point   int32 (ceil(out*b/32), n_groups)   z packed along out (asymmetric only)
    <m>.weight_shape        int64 (2,)                   [out, in]
The library works with signed codes and zeros in [-2^(b-1), 2^(b-1)-1] and adds 2^(b-1) before
packing, so the stored fields are exactly our unsigned asymmetric codes and zeros (and q + 2^(b-1)
for a symmetric grid, whose zero point is 0 and is not stored).  Dequantization is
(q - z) * s, our grid, so the export is exact.

The 3/5/6/7-bit stream with fields straddling words is the layout of compressed-tensors >= 0.18
(earlier versions used 32 // b fields per word and do not check the version on load); 2/4/8-bit
files are the same in both.  Load asymmetric files with
``CompressedTensorsConfig(dequantize=True)`` (``run_compressed=False``): the compressed-in-place
path of the current reader mishandles asymmetric zero points.  Several group sizes in one model
(SmolLM2 g128 uses g96 on its 576-wide layers) become one config group per size; transformers
5.24 loads that for symmetric grids (default path) but not for asymmetric ones (its
``dequantize=True`` path applies one group's scheme to all layers), so a warning says so.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from .grid import group_sizes, quantized_layers, require_integer_zeros
from .hf_dir import check_target, dense_tensors, write_hf_dir
from .packing import pack_columns, pack_rows
from .provenance import provenance

FORMAT = "compressed-tensors"
LAYOUT_VERSION = "0.20.0"     # the library version this layout was checked against

log = logging.getLogger(__name__)


def export_compressed_tensors(model: nn.Module, out_dir, tokenizer=None) -> str:
    check_target(out_dir)
    cfg, layers = quantized_layers(model)
    if not layers[0].symmetric:
        require_integer_zeros(layers, FORMAT)
    if not layers[0].symmetric and len(group_sizes(layers)) > 1:
        log.warning("compressed-tensors export with several group sizes (%s) and asymmetric codes: the "
                    "format holds it (one config group per size), but transformers 5.24 cannot load it "
                    "(dequantize=True applies one group's scheme to every layer, and the default path "
                    "mishandles asymmetric zero points); quantize with one group size (e.g. g64 for "
                    "SmolLM2) to load it in transformers", ", ".join(
                        "per channel" if g is None else f"g{g}" for g in group_sizes(layers)))
    tensors = dense_tensors(model, {layer.name for layer in layers})
    for layer in layers:
        tensors[f"{layer.name}.weight_packed"] = pack_rows(layer.codes, layer.bits)
        tensors[f"{layer.name}.weight_scale"] = layer.scales.contiguous()
        tensors[f"{layer.name}.weight_shape"] = torch.tensor([layer.out_features, layer.in_features],
                                                             dtype=torch.int64)
        if not layer.symmetric:
            tensors[f"{layer.name}.weight_zero_point"] = pack_columns(layer.zeros.to(torch.int64), layer.bits)
    qc = quantization_config(model, layers)
    return write_hf_dir(model, out_dir, tensors, qc,
                        provenance(model, cfg, FORMAT, layout_version=LAYOUT_VERSION), tokenizer)


def quantization_config(model: nn.Module, layers) -> dict:
    by_size = group_sizes(layers)
    quantized = {layer.name for layer in layers}
    ignore = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized)
    targets = _targets(by_size)
    groups = {}
    for i, (g, names) in enumerate(sorted(by_size.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))):
        weights = {"num_bits": layers[0].bits, "type": "int", "symmetric": layers[0].symmetric,
                   "strategy": "channel" if g is None else "group", "group_size": g, "dynamic": False}
        groups[f"group_{i}"] = {"targets": targets[g], "weights": weights, "input_activations": None,
                                "output_activations": None, "format": None}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "quantization_status": "compressed", "version": LAYOUT_VERSION, "config_groups": groups,
            "ignore": ignore, "sparsity_config": {}, "transform_config": {}, "kv_cache_scheme": None,
            "global_compression_ratio": None}


def _targets(by_size: dict) -> dict:
    """Targets of each group size: every Linear when there is one size (``ignore`` takes out the
    rest), else regexes on the module name after the layer index (``mlp.down_proj``) when each such
    suffix has one size, else the exact module names."""
    if len(by_size) == 1:
        return {g: ["Linear"] for g in by_size}
    suffix_sizes: dict[str, set] = {}
    for g, names in by_size.items():
        for n in names:
            suffix_sizes.setdefault(_suffix(n), set()).add(g)
    if all(len(s) == 1 for s in suffix_sizes.values()):
        return {g: sorted({f"re:.*\\.{re.escape(_suffix(n))}$" for n in names}) for g, names in by_size.items()}
    return {g: [f"re:^{re.escape(n)}$" for n in names] for g, names in by_size.items()}


def _suffix(name: str) -> str:
    parts = name.split(".")
    last_index = max((i for i, p in enumerate(parts) if p.isdigit()), default=-1)
    return ".".join(parts[last_index + 1:])
