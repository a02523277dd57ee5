"""What the engine needs to know about each model family, in one place, as data.

The engine never looks at module names itself: it asks this module for the decoder layers, the
linears of a layer, and how to call a layer with the keyword arguments (attention mask, position
ids, rotary embeddings) that the model itself passed to layer 0, captured once by a forward
pre-hook.

Each family is described by its *edges*: a module that produces a tensor and the linears that read
exactly that tensor as their input.  In a Llama-style layer:

    input_layernorm           -> q_proj, k_proj, v_proj
    v_proj (through attention) -> o_proj
    post_attention_layernorm  -> gate_proj, up_proj
    up_proj (times act(gate))  -> down_proj

Along an edge, multiplying the producer's output channel ``j`` by ``c_j`` and the consumers' input
column ``j`` by ``1 / c_j`` leaves the layer's output unchanged (a norm's weight, a linear's rows and
bias are per output channel; attention mixes ``v`` only across tokens, ``act(gate) * up`` is linear in
``up``).  The linears of a layer and their grouping come from this table; channel-scale folding,
rotations and exports are to walk exactly these edges (``channel_edges``).  The ``v -> o``
edge goes through the attention heads: ``o_proj``'s input channel ``(head h, d)`` is ``v_proj``'s
output row ``(kv head h // (num_heads / num_kv_heads), d)`` under grouped-query attention, so a scale
on ``o``'s input folds into ``v`` only if the heads sharing a kv head share it (``HeadLayout``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Edge:
    """``producer`` (a module path inside a decoder layer) writes the tensor the ``consumers`` read."""
    producer: str
    consumers: tuple[str, ...]
    through_heads: bool = False      # reaches the consumers through attention (v_proj -> o_proj)


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    edges: tuple[Edge, ...]          # in execution order
    notes: str = ""

    @property
    def linear_groups(self) -> tuple[tuple[str, ...], ...]:
        """The linears of a layer grouped by the tensor they read, in execution order."""
        return tuple(e.consumers for e in self.edges)

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(n for group in self.linear_groups for n in group)


_LLAMA_EDGES = (
    Edge("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    Edge("self_attn.v_proj", ("self_attn.o_proj",), through_heads=True),
    Edge("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    Edge("mlp.up_proj", ("mlp.down_proj",)),
)

FAMILIES = (
    Family("llama", ("llama",), _LLAMA_EDGES, "tied embeddings (SmolLM) are left unquantized"),
    Family("mistral", ("mistral",), _LLAMA_EDGES),
    Family("qwen2", ("qwen2",), _LLAMA_EDGES, "q/k/v carry a bias (scaled with v's rows on the v -> o edge)"),
    Family("qwen3", ("qwen3",), _LLAMA_EDGES,
           "q_norm/k_norm act after q/k_proj per head and stay full precision; head_dim is its own setting"),
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


def final_norm(model: nn.Module) -> nn.Module:
    """The norm between the last decoder layer and the LM head."""
    norm = getattr(_base(model), "norm", None)
    if norm is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no model.norm (final norm)")
    return norm


def layer_linears(model: nn.Module, layer: nn.Module) -> dict[str, nn.Module]:
    """``{"self_attn.q_proj": module, ...}`` for one decoder layer, in execution order."""
    fam = family_of(model)
    return {name: layer.get_submodule(name) for name in fam.linear_names}


# ---- edges bound to a model -----------------------------------------------------------------------
@dataclass(frozen=True)
class HeadLayout:
    """How attention splits its channels: ``num_heads`` query heads share ``num_kv_heads`` key/value
    heads (grouped-query attention), each ``head_dim`` wide."""
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        """Query heads per kv head."""
        return self.num_heads // self.num_kv_heads

    def kv_channel_map(self) -> torch.Tensor:
        """For each channel ``h * head_dim + d`` of the attention output (o_proj's input), the
        v_proj output row ``(h // group) * head_dim + d`` it is a mixture of."""
        h = torch.arange(self.num_heads).repeat_interleave(self.head_dim)
        d = torch.arange(self.head_dim).repeat(self.num_heads)
        return (h // self.group) * self.head_dim + d


def head_layout(model: nn.Module) -> HeadLayout:
    cfg = model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if heads % kv:
        raise UnsupportedModelError(f"{heads} attention heads are not a multiple of {kv} key/value heads")
    return HeadLayout(heads, kv, head_dim)


@dataclass(frozen=True)
class ChannelEdge:
    """One edge of one decoder layer with its widths read from the modules themselves."""
    layer: int
    producer: str
    consumers: tuple[str, ...]
    channels: int                          # the producer's output channels (a scale folded into it)
    consumer_channels: int                 # the consumers' input width
    channel_map: torch.Tensor | None       # consumer column j reads producer channel channel_map[j]
    heads: HeadLayout | None = None        # set on the edge through attention

    def consumer_scale(self, c: torch.Tensor) -> torch.Tensor:
        """A per-producer-channel vector ``c`` as seen by the consumers' input columns."""
        return c if self.channel_map is None else c[self.channel_map.to(c.device)]


def channel_edges(model: nn.Module) -> list[ChannelEdge]:
    """Every edge of every decoder layer, checked against the real module shapes.

    Raises ``UnsupportedModelError`` when a module does not have the shape the family's table
    implies (a producer that is not per channel, consumers of different widths)."""
    fam = family_of(model)
    heads = head_layout(model)
    edges = []
    for i, layer in enumerate(decoder_layers(model)):
        for e in fam.edges:
            producer = layer.get_submodule(e.producer)
            consumers = [layer.get_submodule(n) for n in e.consumers]
            channels = _out_channels(producer, e.producer)
            widths = {c.in_features for c in consumers}
            if len(widths) != 1:
                raise UnsupportedModelError(f"layer {i}: {', '.join(e.consumers)} read inputs of different "
                                            f"widths {sorted(widths)}")
            width = widths.pop()
            channel_map, edge_heads = None, None
            if e.through_heads:
                edge_heads = heads
                expected = (heads.num_kv_heads * heads.head_dim, heads.num_heads * heads.head_dim)
                if (channels, width) != expected:
                    raise UnsupportedModelError(
                        f"layer {i}: {e.producer} -> {', '.join(e.consumers)} is {channels} -> {width} "
                        f"channels, the head layout {heads} implies {expected[0]} -> {expected[1]}")
                channel_map = heads.kv_channel_map()
            elif channels != width:
                raise UnsupportedModelError(f"layer {i}: {e.producer} writes {channels} channels, "
                                            f"{', '.join(e.consumers)} read {width}")
            edges.append(ChannelEdge(i, e.producer, e.consumers, channels, width, channel_map, edge_heads))
    return edges


def _out_channels(module: nn.Module, name: str) -> int:
    if hasattr(module, "out_features"):   # nn.Linear, or a QuantLinear wrapping one
        return module.out_features
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return weight.numel()            # a norm with a per-channel weight
    raise UnsupportedModelError(f"{name} ({type(module).__name__}) has no per-channel output to scale")


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
