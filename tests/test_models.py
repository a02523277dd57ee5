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
