"""What the engine needs to know about each model family, in one place.

The engine never looks at module names itself: it asks this module for the decoder layers, the
linears of a layer (grouped by the input they read, for channel scaling and GPTQ), and how to call
a layer with the keyword arguments (attention mask, position ids, rotary embeddings) that the model
itself passed to layer 0, captured once by a forward pre-hook.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    # linears of one decoder layer, grouped by the tensor they read (same norm / same producer)
    linear_groups: tuple[tuple[str, ...], ...]
    notes: str = ""

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(n for group in self.linear_groups for n in group)


_LLAMA_LINEARS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),   # input_layernorm
    ("self_attn.o_proj",),                                           # attention output
    ("mlp.gate_proj", "mlp.up_proj"),                                # post_attention_layernorm
    ("mlp.down_proj",),                                              # act(gate) * up
)

FAMILIES = (
    Family("llama", ("llama",), _LLAMA_LINEARS, "tied embeddings (SmolLM) are left unquantized"),
    Family("mistral", ("mistral",), _LLAMA_LINEARS),
    Family("qwen2", ("qwen2",), _LLAMA_LINEARS, "q/k/v carry a bias"),
    Family("qwen3", ("qwen3",), _LLAMA_LINEARS, "q_norm/k_norm stay full precision"),
)


class UnsupportedModelError(ValueError):
    pass


def family_of(model: nn.Module) -> Family:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    supported = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise UnsupportedModelError(
        f"model type {model_type!r} ({type(model).__name__}) is not supported; "
        f"sliderquant supports the families: {supported}")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    family_of(model)
    return _base(model).layers


def embeddings(model: nn.Module) -> nn.Module:
    return _base(model).embed_tokens


def rotary_embedding(model: nn.Module) -> nn.Module | None:
    return getattr(_base(model), "rotary_emb", None)


def layer_linears(model: nn.Module, layer: nn.Module) -> dict[str, nn.Module]:
    """``{"self_attn.q_proj": module, ...}`` for one decoder layer, in execution order."""
    fam = family_of(model)
    return {name: layer.get_submodule(name) for name in fam.linear_names}


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _base(model: nn.Module) -> nn.Module:
    base = getattr(model, "model", model)
    if not hasattr(base, "layers") or not hasattr(base, "embed_tokens"):
        raise UnsupportedModelError(f"{type(model).__name__} has no model.layers / model.embed_tokens")
    return base


# ---- calling decoder layers ----------------------------------------------------------------------
class _StopForward(Exception):
    pass


_DROP_KWARGS = ("past_key_values", "past_key_value", "use_cache", "output_attentions")


@torch.no_grad()
def capture_layer0_inputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8):
    """Run the embeddings on ``input_ids`` (N, T) and return ``(X, layer_kwargs)``.

    ``X`` (N, T, d) is the input of decoder layer 0; ``layer_kwargs`` are the keyword arguments the
    model passes to every decoder layer, captured from a batch of one so that their batch dimension
    broadcasts over any mini-batch.
    """
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    captured: dict = {}

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        captured["x"] = hidden.detach()
        captured["kwargs"] = {k: v for k, v in kwargs.items()
                              if k not in _DROP_KWARGS and k != "hidden_states"}
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    try:
        chunks = []
        for start in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids[start:start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
            chunks.append(captured["x"])
        try:
            model(input_ids[:1].to(device), use_cache=False)
        except _StopForward:
            pass
        layer_kwargs = captured["kwargs"]
    finally:
        handle.remove()
        model.config.use_cache = use_cache
    return torch.cat(chunks), layer_kwargs


def call_layer(layer: nn.Module, x: torch.Tensor, layer_kwargs: dict) -> torch.Tensor:
    out = layer(x, **layer_kwargs)
    return out[0] if isinstance(out, tuple) else out


def kwargs_to(layer_kwargs: dict, device=None, dtype=None) -> dict:
    """Move the captured tensors (and floating ones to ``dtype``)."""
    def move(v):
        if isinstance(v, torch.Tensor):
            return v.to(device=device, dtype=dtype if (dtype and v.is_floating_point()) else None)
        if isinstance(v, tuple):
            return tuple(move(t) for t in v)
        return v
    return {k: move(v) for k, v in layer_kwargs.items()}
