"""The public verbs: ``quantize``, ``save``, ``load``.

    model = AutoModelForCausalLM.from_pretrained(...)
    calib = sliderquant.data.get_calibration("c4", tokenizer, nsamples=128, seqlen=2048, seed=0)
    sliderquant.quantize(model, "configs/w2a16.yaml", calib)
    sliderquant.save(model, "out/")
    model = sliderquant.load("out/")

``save`` writes an ordinary Hugging Face directory (config + safetensors of the dequantized
weights, so ``from_pretrained`` alone loads a working model) plus ``sliderquant_quant.safetensors``
(integer codes int16, scales and zero points per quantized linear) and ``sliderquant_quant.json``
(format version, QuantConfig, list of quantized modules).
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from .config import QuantConfig

QUANT_TENSORS = "sliderquant_quant.safetensors"
QUANT_META = "sliderquant_quant.json"
FORMAT_VERSION = 1


def _as_config(config) -> QuantConfig:
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, dict):
        return QuantConfig.from_dict(config)
    if isinstance(config, (str, os.PathLike)):
        return QuantConfig.from_yaml(config)
    raise TypeError(f"config must be a QuantConfig, a dict or a YAML path, got {type(config).__name__}")


def quantize(model: nn.Module, config, calibration: torch.Tensor | None = None,
             work_dir: str | None = None, on_window=None) -> nn.Module:
    """Quantize ``model`` in place and return it.

    ``calibration`` is a LongTensor of token ids (nsamples, seqlen); not needed by methods that
    do not calibrate (``rtn``).  ``work_dir`` makes the run resumable: rerunning with the same
    arguments continues after the last completed window.  ``on_window(done, total, row)`` is
    called after each completed window of the window-training methods (progress, early exit).
    """
    from .engine import quantize_model
    from .methods import get_method
    cfg = _as_config(config)
    if get_method(cfg.method).needs_calibration and calibration is None:
        raise ValueError(f"method {cfg.method!r} needs calibration token ids (nsamples, seqlen)")
    if on_window is not None and not callable(on_window):
        raise TypeError(f"on_window must be a callable (done, total, row), got {type(on_window).__name__}")
    extra = {} if on_window is None else {"on_window": on_window}   # TEMP until the engine takes it
    return quantize_model(model, cfg, calibration, work_dir=work_dir, **extra)


def save(model: nn.Module, directory: str, tokenizer=None) -> None:
    """Write ``model`` (quantized by ``quantize``) as a Hugging Face directory plus its codes."""
    from safetensors.torch import save_file
    state = getattr(model, "sliderquant_state", None)
    if state is None:
        raise ValueError("save: this model carries no sliderquant quantization state; "
                         "call sliderquant.quantize(model, ...) first")
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state["tensors"].items()}
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors})
    _atomic(os.path.join(directory, QUANT_TENSORS), lambda p: save_file(tensors, p))
    meta = {"format_version": FORMAT_VERSION, "config": state["config"], "modules": modules}
    _atomic(os.path.join(directory, QUANT_META),
            lambda p: open(p, "w", encoding="utf-8").write(json.dumps(meta, indent=1)))


def load(directory: str, **from_pretrained_kwargs) -> nn.Module:
    """Load a directory written by ``save``: the HF model with ``sliderquant_state`` attached.

    Checks that the metadata, the codes and the weights agree; a corrupt or partial directory
    raises ``ValueError`` saying which file is wrong.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from .quantizer import dequantize

    meta_path, tensor_path = os.path.join(directory, QUANT_META), os.path.join(directory, QUANT_TENSORS)
    for p in (meta_path, tensor_path):
        if not os.path.exists(p):
            raise ValueError(f"{directory} is not a sliderquant directory: {os.path.basename(p)} is missing")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        cfg = QuantConfig.from_dict(meta["config"])
        modules, version = list(meta["modules"]), meta["format_version"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{meta_path} is corrupt or incomplete ({e}); re-run sliderquant save") from None
    if version != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: format version {version} is not supported (expected {FORMAT_VERSION})")
    try:
        tensors = load_file(tensor_path)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{tensor_path} is corrupt or truncated ({e}); re-run sliderquant save") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, **from_pretrained_kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{directory}: the Hugging Face model files could not be loaded ({e})") from None
    for name in modules:
        try:
            q, s, z = (tensors[f"{name}.{k}"] for k in ("qweight", "scales", "zeros"))
        except KeyError:
            raise ValueError(f"{tensor_path} lacks the codes of {name}; the file is incomplete") from None
        weight = model.get_submodule(name).weight
        w_hat = dequantize(q, s, z).to(weight.dtype)
        if w_hat.shape != weight.shape or not torch.allclose(w_hat.float(), weight.float(),
                                                             rtol=1e-2, atol=1e-6):
            raise ValueError(f"{directory}: the weights of {name} do not match its stored codes; "
                             f"the model files and {QUANT_TENSORS} come from different runs")
    model.sliderquant_state = {"config": cfg.to_dict(), "tensors": tensors}
    return model


def _atomic(path: str, write) -> None:
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)
