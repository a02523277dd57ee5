"""The public verbs: ``quantize``, ``save``, ``load``.

    model = AutoModelForCausalLM.from_pretrained(...)
    calib = sliderquant.data.get_calibration("c4", tokenizer, nsamples=128, seqlen=2048, seed=0)
    sliderquant.quantize(model, "configs/w2a16.yaml", calib)
    sliderquant.save(model, "out/")
    model = sliderquant.load("out/")

``save`` writes an ordinary Hugging Face directory (config + safetensors of the dequantized
weights, so ``from_pretrained`` alone loads a working model) plus ``sliderquant_quant.safetensors``
(integer codes int16, scales and zero points per quantized linear) and ``sliderquant_quant.json``
(format version, QuantConfig, list of quantized modules, dtype of each saved weight).  It builds
the directory beside the target and renames it into place at the end, so a failure leaves
nothing half-written.  A model that transformers loaded from GGUF saves like any other: its
weights are already dequantized plain tensors; only the GGUF marks are left out of the files.

``load`` verifies exactly: every linear of every decoder layer (the family's list in ``models``)
must have codes, and no codes may name anything else; codes must lie on the config's grid and
scales/zeros have the layer's shape; and the dequantized codes, cast the way the weight was
produced (fp32 ``(q - zero) * scale``, then the saved dtype, then the loaded dtype), must equal
the loaded weight bit for bit.  GPTQ computes its weights with the same expression in the same
order, so the check is the same for every method.
"""

from __future__ import annotations

import contextlib
import json
import os

import torch
from torch import nn

from .atomic_dir import atomic_dir
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
    return quantize_model(model, cfg, calibration, work_dir=work_dir, on_window=on_window)


def save(model: nn.Module, directory, tokenizer=None) -> None:
    """Write ``model`` (quantized by ``quantize``) as a Hugging Face directory plus its codes.

    ``directory`` must be new, empty, or an earlier output (it is then replaced as a whole).
    """
    directory = os.fspath(directory)
    _state_of(model)
    if os.path.isdir(directory) and os.listdir(directory) and not (
            os.path.exists(os.path.join(directory, "config.json"))
            or os.path.exists(os.path.join(directory, QUANT_META))):
        raise ValueError(f"save: {directory} exists and holds other files; choose a new directory "
                         f"or empty it (an earlier sliderquant or Hugging Face output is replaced)")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"save: {directory} exists and is not a directory; choose another path")
    with atomic_dir(directory) as tmp:
        with _without_gguf_marks(model):
            model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_codes(model, tmp)


def write_codes(model: nn.Module, directory) -> None:
    """Write only the codes, scales, zero points and metadata of ``model`` into ``directory``
    (what ``save`` adds to the Hugging Face files; also the CLI's rescue file)."""
    from safetensors.torch import save_file
    state = _state_of(model)
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state["tensors"].items()}
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors})
    dtypes = {name: str(model.get_submodule(name).weight.dtype).replace("torch.", "") for name in modules}
    _atomic(os.path.join(directory, QUANT_TENSORS), lambda p: save_file(tensors, p))
    meta = {"format_version": FORMAT_VERSION, "config": state["config"], "modules": modules,
            "weight_dtypes": dtypes}
    _atomic(os.path.join(directory, QUANT_META),
            lambda p: open(p, "w", encoding="utf-8").write(json.dumps(meta, indent=1)))


def load(directory, packed: bool = False, **from_pretrained_kwargs) -> nn.Module:
    """Load a directory written by ``save``: the HF model with ``sliderquant_state`` attached.

    Checks that the metadata, the codes and the weights agree exactly; a corrupt, partial or
    mismatched directory raises ``ValueError`` saying which file is wrong.  ``packed=True``
    returns ``sliderquant.packed.pack_model(model)``: the quantized linears become
    ``PackedLinear`` modules that run from their 2-8-bit codes (CPU inference).
    """
    from transformers import AutoModelForCausalLM
    directory = os.fspath(directory)
    cfg, meta, tensors = _read_codes(directory)
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, **from_pretrained_kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{directory}: the Hugging Face model files could not be loaded ({e})") from None
    where = f"{directory}: "
    for name, (q, s, z) in _check_codes(model, cfg, meta, tensors, where).items():
        weight = model.get_submodule(name).weight
        if not torch.equal(_as_saved(q, s, z, meta, name, weight.dtype), weight.detach()):
            raise ValueError(f"{where}the weights of {name} do not equal its stored codes; the model "
                             f"files and {QUANT_TENSORS} come from different runs or were modified")
    model.sliderquant_state = {"config": cfg.to_dict(), "tensors": tensors}
    if packed:
        from .packed import pack_model
        return pack_model(model)
    return model


def apply_codes(model: nn.Module, directory) -> nn.Module:
    """Put the codes in ``directory`` (a ``save`` output or a rescue file) onto ``model``, the
    full-precision model they were made from: each quantized linear's weight becomes its
    dequantized codes, exactly as ``quantize`` left it.  Returns the model, ready for ``save``."""
    directory = os.fspath(directory)
    if getattr(model, "sliderquant_state", None) is not None:
        raise ValueError("apply_codes: this model is already quantized by sliderquant; start from the fp model")
    cfg, meta, tensors = _read_codes(directory)
    checked = _check_codes(model, cfg, meta, tensors, f"{directory}: ")
    with torch.no_grad():
        for name, (q, s, z) in checked.items():
            weight = model.get_submodule(name).weight
            weight.copy_(_as_saved(q, s, z, meta, name, weight.dtype))
    model.sliderquant_state = {"config": cfg.to_dict(), "tensors": tensors}
    return model


# ---- reading and checking the codes ------------------------------------------------------------------
def _state_of(model) -> dict:
    state = getattr(model, "sliderquant_state", None)
    if state is None:
        raise ValueError("save: this model carries no sliderquant quantization state; "
                         "call sliderquant.quantize(model, ...) first")
    return state


def _read_codes(directory: str):
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    meta_path, tensor_path = os.path.join(directory, QUANT_META), os.path.join(directory, QUANT_TENSORS)
    for p in (meta_path, tensor_path):
        if not os.path.exists(p):
            raise ValueError(f"{directory} is not a sliderquant directory: {os.path.basename(p)} is missing")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        cfg = QuantConfig.from_dict(meta["config"])
        modules, version = list(meta["modules"]), meta["format_version"]
        dtypes = meta.get("weight_dtypes", {})
        if not all(isinstance(m, str) for m in modules) or not isinstance(dtypes, dict):
            raise ValueError("modules must be a list of names and weight_dtypes a mapping")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{meta_path} is corrupt or incomplete ({e}); re-run sliderquant save") from None
    if version != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: format version {version} is not supported (expected {FORMAT_VERSION})")
    try:
        tensors = load_file(tensor_path)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{tensor_path} is corrupt or truncated ({e}); re-run sliderquant save") from None
    return cfg, {"modules": modules, "weight_dtypes": dtypes}, tensors


def quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Full name -> module of every linear that ``quantize`` quantizes: each linear of the family's
    list in every decoder layer."""
    from . import models
    layers = models.decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    return {f"{prefix}.{i}.{name}": lin for i, layer in enumerate(layers)
            for name, lin in models.layer_linears(model, layer).items()}


def _check_codes(model, cfg: QuantConfig, meta: dict, tensors: dict, where: str) -> dict:
    """``{module: (q, scale, zero)}`` for every quantized linear of ``model``, after checking that
    the codes cover exactly those linears, lie on the config's grid and have the layer's shapes."""
    from .quantizer import layer_group_size
    try:
        expected = quantized_linears(model)
    except ValueError as e:
        raise ValueError(f"{where}{e}") from None
    parts = ("qweight", "scales", "zeros")
    named: dict[str, dict] = {}
    for key, t in tensors.items():
        name, _, part = key.rpartition(".")
        if part not in parts:
            raise ValueError(f"{where}{QUANT_TENSORS} holds an unexpected tensor {key!r}")
        if name not in expected:
            raise ValueError(f"{where}{QUANT_TENSORS} holds codes for {name!r}, which is not a quantized "
                             f"linear of this model; the files come from a different model")
        named.setdefault(name, {})[part] = t
    for name in expected:
        if name not in named or len(named[name]) != len(parts):
            raise ValueError(f"{where}{QUANT_TENSORS} lacks the codes of {name}; the file is incomplete")
    if sorted(meta["modules"]) != sorted(expected):
        raise ValueError(f"{where}{QUANT_META} lists {len(meta['modules'])} quantized modules, the model "
                         f"has {len(expected)} quantized linears; the metadata was modified or is from "
                         f"another model")
    if cfg.symmetric:
        qmin, qmax = -2 ** (cfg.wbits - 1), 2 ** (cfg.wbits - 1) - 1
    else:
        qmin, qmax = 0, 2 ** cfg.wbits - 1
    out = {}
    for name, lin in expected.items():
        q, s, z = (named[name][p] for p in parts)
        out_f, in_f = lin.weight.shape
        g = layer_group_size(in_f, cfg.group_size)
        groups = 1 if g is None else in_f // g
        if q.dtype != torch.int16 or tuple(q.shape) != (out_f, in_f):
            raise ValueError(f"{where}{name}.qweight is {q.dtype} {tuple(q.shape)}, expected torch.int16 "
                             f"{(out_f, in_f)}")
        for part, t in (("scales", s), ("zeros", z)):
            if t.dtype != torch.float32 or tuple(t.shape) != (out_f, groups):
                raise ValueError(f"{where}{name}.{part} is {t.dtype} {tuple(t.shape)}, expected torch.float32 "
                                 f"{(out_f, groups)} for group size {cfg.group_size}")
        if q.numel() and (int(q.min()) < qmin or int(q.max()) > qmax):
            raise ValueError(f"{where}{name}.qweight has codes outside [{qmin}, {qmax}], the range of "
                             f"{cfg.wbits}-bit {'symmetric' if cfg.symmetric else 'asymmetric'} codes")
        if not bool(torch.isfinite(s).all() and (s > 0).all()) or not bool(torch.isfinite(z).all()):
            raise ValueError(f"{where}{name}: scales must be finite and positive, zeros finite")
        if cfg.symmetric and bool((z != 0).any()):
            raise ValueError(f"{where}{name}: symmetric codes must have zero points of 0")
        out[name] = (q, s, z)
    return out


def _as_saved(q, s, z, meta: dict, name: str, dtype: torch.dtype) -> torch.Tensor:
    """The weight the codes give, cast the way ``quantize`` and ``save`` cast it: the fp32
    dequantization, then the dtype the weight was saved in, then ``dtype``."""
    from .quantizer import dequantize
    saved = meta["weight_dtypes"].get(name)
    saved_dtype = getattr(torch, saved, None) if isinstance(saved, str) else None
    if saved is not None and not isinstance(saved_dtype, torch.dtype):
        raise ValueError(f"{QUANT_META}: weight dtype {saved!r} of {name} is not a torch dtype")
    w = dequantize(q, s, z)
    if saved_dtype is not None:
        w = w.to(saved_dtype)
    return w.to(dtype)


# ---- writing ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _without_gguf_marks(model):
    """Hide, while saving, what transformers attaches to a model it loaded from GGUF.

    transformers dequantizes GGUF weights into ordinary float tensors on load but keeps an
    ``hf_quantizer`` (and ``config.quantization_config``) that makes ``save_pretrained`` refuse
    ("quantized with gguf and is not serializable").  The tensors are plain, so the model is saved
    as the ordinary floating-point checkpoint it is; the marks are put back afterwards.  Any other
    transformers quantization (real packed weights) is refused with a sentence.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        yield
        return
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    method = getattr(method, "value", method)
    if method != "gguf":
        raise ValueError(f"save: the model's weights are quantized by transformers ({method}); sliderquant "
                         f"quantizes and saves full-precision models: load the model without quantization")
    saved_attrs = {k: model.__dict__[k] for k in ("hf_quantizer", "is_quantized", "quantization_method")
                   if k in model.__dict__}
    config = model.config
    had_qc = "quantization_config" in config.__dict__
    qc = config.__dict__.get("quantization_config")
    try:
        model.hf_quantizer = None
        model.is_quantized = False
        model.quantization_method = None
        if had_qc:
            del config.quantization_config
        yield
    finally:
        for k in ("hf_quantizer", "is_quantized", "quantization_method"):
            if k in saved_attrs:
                setattr(model, k, saved_attrs[k])
            else:
                model.__dict__.pop(k, None)
        if had_qc:
            config.quantization_config = qc


def _atomic(path: str, write) -> None:
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)
