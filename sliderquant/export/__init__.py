"""``export(model, out, format=...)``: write a quantized model in a format inference engines read.

Formats (each module imported only when used, so a missing optional reader/writer package costs
nothing until that format is asked for):

    compressed-tensors   HF directory, pack-quantized (transformers + compressed-tensors, vLLM);
                         bits 2-8, symmetric or asymmetric, per channel or grouped
    gptq                 HF directory, GPTQ (gptq_v2 when asymmetric, gptq v1 when symmetric);
                         bits 2, 3, 4, 8; one group size per model
    awq                  HF directory, AWQ gemm; 4-bit asymmetric only
    gguf                 one .gguf file for llama.cpp (Llama family)

Every format refuses a grid it cannot hold before writing anything, writes into a temporary
path beside the target and renames it at the end, and records in its config which tool, method
and settings produced it.
"""

from __future__ import annotations

import importlib
import os
import sys

# format -> (module, function, what the target is)
FORMATS = {
    "compressed-tensors": ("compressed_tensors", "export_compressed_tensors", "directory"),
    "gptq": ("gptq", "export_gptq", "directory"),
    "awq": ("awq", "export_awq", "directory"),
    "gguf": ("gguf", "export_gguf", "file"),
}


def export(model, out, format: str = "compressed-tensors", tokenizer=None, **options) -> str:
    """Write ``model`` (quantized by ``sliderquant.quantize`` or loaded by ``sliderquant.load``) to
    ``out`` in ``format`` and return the path written.  ``tokenizer``: its files are written too
    (HF formats) or its vocabulary embedded (GGUF).  ``options`` go to the format's writer."""
    if format not in FORMATS:
        raise ValueError(f"export: unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if getattr(model, "sliderquant_state", None) is None:
        raise ValueError("export: this model carries no sliderquant quantization state; call "
                         "sliderquant.quantize(model, ...) or load a directory written by sliderquant.save")
    module, function, _ = FORMATS[format]
    writer = getattr(importlib.import_module(f".{module}", __name__), function)
    return writer(model, os.fspath(out), tokenizer=tokenizer, **options)


class _CallablePackage(type(importlib)):
    """``sliderquant.export`` is both this package and the verb: ``sliderquant.export(model, out)``.

    Binding the function over the package name in ``sliderquant/__init__`` would break
    ``import sliderquant.export.packing as p`` (that form looks the package up as an attribute), so
    the package itself is made callable instead.
    """

    def __call__(self, model, out, format: str = "compressed-tensors", tokenizer=None, **options) -> str:
        return export(model, out, format=format, tokenizer=tokenizer, **options)


sys.modules[__name__].__class__ = _CallablePackage
