"""Writing a Hugging Face directory (config, one safetensors file, tokenizer) all or nothing.

The directory is built in a temporary directory beside the target and renamed into place at the
end, so a failure leaves no half-written export; an earlier export at the target is replaced as a
whole, anything else there is refused.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from ..atomic_dir import atomic_dir


def check_target(out_dir: str) -> str:
    """Refuse a target that is a file or a directory holding something other than an earlier export."""
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"export: {out_dir} exists and is not a directory; choose another path")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.exists(os.path.join(out_dir, "config.json")):
        raise ValueError(f"export: {out_dir} exists and holds other files; choose a new directory or "
                         f"empty it (an earlier export is replaced)")
    return out_dir


def dense_tensors(model: nn.Module, packed_modules: set[str]) -> dict[str, torch.Tensor]:
    """The model's state dict without the weights of ``packed_modules`` and without the second name
    of a tied tensor (transformers re-ties them from the config)."""
    out, seen = {}, set()
    for key, t in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if leaf == "weight" and module in packed_modules:
            continue
        ident = (t.data_ptr(), tuple(t.shape), t.dtype)
        if t.numel() and ident in seen:
            continue
        seen.add(ident)
        out[key] = t.detach().cpu().contiguous()
    return out


def write_hf_dir(model: nn.Module, out_dir: str, tensors: dict[str, torch.Tensor],
                 quantization_config: dict, provenance: dict, tokenizer=None,
                 extra_json: dict[str, dict] | None = None) -> str:
    from safetensors.torch import save_file
    out_dir = check_target(out_dir)
    with atomic_dir(out_dir) as tmp:
        config = model.config.to_dict()
        config.pop("quantization_config", None)      # e.g. the GGUF mark of a model loaded from .gguf
        if not config.get("architectures"):          # absent on models loaded from .gguf; engines need it
            config["architectures"] = [type(model).__name__]
        config["quantization_config"] = quantization_config
        config["sliderquant"] = provenance
        _write_json(os.path.join(tmp, "config.json"), config)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        for name, content in (extra_json or {}).items():
            _write_json(os.path.join(tmp, name), content)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir


def _write_json(path: str, content: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2, sort_keys=False)
        f.write("\n")
