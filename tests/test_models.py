"""Per-family knowledge: tiny random models of every supported family, built from config objects."""

import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM)

from sliderquant import models

VOCAB = 96
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**_COMMON, tie_word_embeddings=True)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**_COMMON)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**_COMMON)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**_COMMON, head_dim=16)),
}


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = FAMILIES[family]().eval()
    # random init leaves biases at zero; give Qwen2's q/k/v biases values so they matter
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    return model


def token_ids(n=6, t=16, seed=0):
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_and_linears(family):
    model = tiny_model(family)
    assert models.family_of(model).name == family
    layers = models.decoder_layers(model)
    assert len(layers) == 3
    lins = models.layer_linears(model, layers[0])
    assert list(lins) == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                          "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert all(isinstance(m, torch.nn.Linear) for m in lins.values())
    if family == "qwen2":
        assert lins["self_attn.q_proj"].bias is not None


@pytest.mark.parametrize("family", list(FAMILIES))
def test_captured_inputs_reproduce_the_model(family):
    """Layer-0 inputs are the embeddings; calling every layer with the captured kwargs and then the
    final norm gives the model's own last hidden state."""
    model = tiny_model(family)
    ids = token_ids()
    x, kwargs = models.capture_layer0_inputs(model, ids, batch_size=4)
    with torch.no_grad():
        assert torch.equal(x, model.model.embed_tokens(ids))
        h = x
        for layer in models.decoder_layers(model):
            h = models.call_layer(layer, h, kwargs)
        ours = model.model.norm(h)
        theirs = model.model(ids).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_unsupported_family_names_supported_ones():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(models.UnsupportedModelError, match="gpt2.*llama.*mistral.*qwen2.*qwen3"):
        models.family_of(model)


# ---- edges: producer -> the linears that read its output ------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_edges_match_the_module_shapes(family):
    model = tiny_model(family)
    heads, kv, hd = 4, 2, 16      # _COMMON above: hidden 64 / 4 heads, 2 kv heads (Qwen3: head_dim=16)
    edges = models.channel_edges(model)
    assert len(edges) == 4 * 3
    by_producer = {e.producer: e for e in edges if e.layer == 1}
    # (consumers, producer channels, consumer input channels), written out from the configs above
    expected = {
        "input_layernorm": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), 64, 64),
        "self_attn.v_proj": (("self_attn.o_proj",), kv * hd, heads * hd),
        "post_attention_layernorm": (("mlp.gate_proj", "mlp.up_proj"), 64, 64),
        "mlp.up_proj": (("mlp.down_proj",), 96, 96),
    }
    assert {p: (e.consumers, e.channels, e.consumer_channels) for p, e in by_producer.items()} == expected
    layer = models.decoder_layers(model)[1]
    for e in by_producer.values():
        for name in e.consumers:
            assert layer.get_submodule(name).in_features == e.consumer_channels
    v = by_producer["self_attn.v_proj"]
    assert (v.heads.num_heads, v.heads.num_kv_heads, v.heads.head_dim) == (heads, kv, hd)
    # head h reads kv head h // 2: o's columns 0..31 come from v rows 0..15 (twice), 32..63 from 16..31
    want = torch.cat([torch.arange(16), torch.arange(16), torch.arange(16, 32), torch.arange(16, 32)])
    assert torch.equal(v.channel_map, want)
    assert all(e.channel_map is None for e in edges if e.producer != "self_attn.v_proj")
    # the layer's linears are exactly the consumers, grouped by the tensor they read
    assert models.family_of(model).linear_groups == tuple(e.consumers for e in by_producer.values())


def _fold(layer, producer, consumers, c_producer, c_consumer):
    """Scale the producer's output channels by ``c_producer`` and the consumers' input columns by
    ``1 / c_consumer`` (what folding a channel scale along an edge does)."""
    with torch.no_grad():
        p = layer.get_submodule(producer)
        if p.weight.dim() == 1:                       # a norm: per-channel weight
            p.weight.mul_(c_producer)
        else:                                         # a linear: its rows and bias
            p.weight.mul_(c_producer[:, None])
            if p.bias is not None:
                p.bias.mul_(c_producer)
        for name in consumers:
            layer.get_submodule(name).weight.div_(c_consumer[None, :])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_scaling_along_every_edge_leaves_the_layer_output_unchanged(family):
    """Oracle: the unmodified layer's own output.  Scales are far from 1 (0.25..4), so an edge whose
    producer or mapping were wrong would change the output by far more than the tolerance."""
    import copy
    model = tiny_model(family)
    x, kwargs = models.capture_layer0_inputs(model, token_ids(n=2))
    layer = models.decoder_layers(model)[0]
    with torch.no_grad():
        ref = models.call_layer(layer, x, kwargs)
    gen = torch.Generator().manual_seed(3)
    for edge in [e for e in models.channel_edges(model) if e.layer == 0]:
        c = 2.0 ** (torch.rand(edge.channels, generator=gen) * 4 - 2)
        scaled = copy.deepcopy(layer)
        _fold(scaled, edge.producer, edge.consumers, c, edge.consumer_scale(c))
        with torch.no_grad():
            out = models.call_layer(scaled, x, kwargs)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5, msg=edge.producer)
        if edge.channel_map is not None:
            # the GQA mapping matters: tiling v's rows over the heads (head h -> kv head h % 2) is wrong
            wrong = c[torch.arange(edge.consumer_channels) % edge.channels]
            bad = copy.deepcopy(layer)
            _fold(bad, edge.producer, edge.consumers, c, wrong)
            with torch.no_grad():
                assert (models.call_layer(bad, x, kwargs) - ref).abs().max() > 1e-2


def test_edges_refuse_a_model_that_does_not_fit_its_table():
    model = tiny_model("llama")
    layer = models.decoder_layers(model)[2]
    layer.mlp.down_proj = torch.nn.Linear(80, 64)        # no longer reads up_proj's 96 channels
    with pytest.raises(models.UnsupportedModelError, match="layer 2: mlp.up_proj writes 96 channels"):
        models.channel_edges(model)
