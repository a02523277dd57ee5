"""GPTQ export: transformers + optimum + gptqmodel (its pure-torch kernel) against our
fake-quantized model, the file layout by hand, and refusals.

Tolerances.  GPTQ stores scales in fp16, so the oracle is our fake-quantized model with its scales
rounded to fp16 ("fq16").  gptqmodel's torch kernel dequantizes each weight as (q - z) * s in fp16:
(q - z) is an exact small integer, so each weight is fq16's rounded once to fp16, relative error
<= 2^-11 (plus 2^-24 absolute for fp16 subnormals); this is checked layer by layer.  Logits then
differ by that rounding carried through the network: bound 2e-3 of the largest logit on the tiny
3-layer models (observed about 2e-4), 5e-3 on SmolLM2-135M, whose 30 layers carry it further
(observed 1.3e-3: 0.039 on logits up to 29).  The figure against the fp32-scale model is only
reported.
"""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import sliderquant
from sliderquant.export import export
from sliderquant.quantizer import dequantize
from test_export_ct import UP_PROJ, exported_by_hand, nibbles, quantized_tiny, u32
from test_export_packing import require_reader
from test_models import token_ids

LOGIT_TOL = 2e-3


def with_fp16_scales(model):
    """Our fake-quantized model with every scale rounded to fp16 (what GPTQ/AWQ files hold)."""
    m16 = copy.deepcopy(model)
    st = model.sliderquant_state["tensors"]
    with torch.no_grad():
        for key, q in st.items():
            if key.endswith(".qweight"):
                name = key[: -len(".qweight")]
                s16 = st[f"{name}.scales"].half().float()
                m16.get_submodule(name).weight.copy_(dequantize(q, s16, st[f"{name}.zeros"]))
    return m16


def read_quantized(path, config):
    require_reader("gptqmodel")
    require_reader("optimum")
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=config)


def check_against_reader(model, reader, ids, names, dequant=lambda module: module.dequantize_weight(),
                         logit_tol=LOGIT_TOL):
    """``dequant(module)``: the reader's own dequantized weight of a loaded layer, (in, out)."""
    m16 = with_fp16_scales(model)
    for name in names:
        theirs = dequant(reader.get_submodule(name)).float().t()
        ours = m16.get_submodule(name).weight
        bound = ours.abs() * 2.0 ** -11 + 2.0 ** -24
        assert bool(((theirs - ours).abs() <= bound).all()), f"{name}: reader weights differ from fq16"
    with torch.no_grad():
        a, a16, b = model(ids).logits, m16(ids).logits, reader(ids).logits
    scale = float(a.abs().max())
    diff16, diff = float((a16 - b).abs().max()), float((a - b).abs().max())
    assert diff16 <= logit_tol * scale, f"max |logit diff| vs fq16 {diff16}, max |logit| {scale}"
    return diff16, diff


def gptq_config(bits):
    from transformers import GPTQConfig
    # gptq_torch: gptqmodel's pure-torch dequantize + matmul (no compiled extension, any bits)
    return GPTQConfig(bits=bits, backend="gptq_torch")


NAMES = ("model.layers.0.self_attn.q_proj", "model.layers.2.mlp.down_proj")


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 32, False), (4, 32, True), (2, 32, False),
                                                       (3, 32, False), (8, None, False)])
def test_reader_gives_our_logits(tmp_path, bits, group_size, symmetric):
    model = quantized_tiny(bits, group_size, symmetric)
    export(model, tmp_path / "gptq", format="gptq")
    reader = read_quantized(tmp_path / "gptq", gptq_config(bits))
    check_against_reader(model, reader, token_ids(), NAMES)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_other_families(tmp_path, family):
    # Qwen2's q/k/v biases travel as <module>.bias beside the packed weight; Mistral's lm_head is untied
    model = quantized_tiny(4, 32, False, family=family)
    export(model, tmp_path / "gptq", format="gptq")
    reader = read_quantized(tmp_path / "gptq", gptq_config(4))
    check_against_reader(model, reader, token_ids(), NAMES)


def test_layout_by_hand(tmp_path):
    t, q, s, z = exported_by_hand(tmp_path / "g", "gptq")
    name = UP_PROJ
    assert t[f"{name}.qweight"].shape == (8, 96) and t[f"{name}.qweight"].dtype == torch.int32
    # word 3 of output column 7: input rows 24..31 of that column, first in the lowest nibble
    assert u32(t[f"{name}.qweight"][3, 7]) == nibbles(q[7, 24 + i] for i in range(8))
    # v2 zeros are z itself, packed along out: word 1 of group 0 holds columns 8..15
    assert t[f"{name}.qzeros"].shape == (2, 12)
    assert u32(t[f"{name}.qzeros"][0, 1]) == nibbles(z[8 + i, 0] for i in range(8))
    assert t[f"{name}.scales"].dtype == torch.float16
    assert torch.equal(t[f"{name}.scales"], s.t().half())
    assert t[f"{name}.g_idx"].tolist() == [i // 32 for i in range(64)]
    config = json.loads((tmp_path / "g" / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["checkpoint_format"] == "gptq_v2" and qc["sym"] is False and qc["group_size"] == 32
    assert qc["bits"] == 4 and qc["desc_act"] is False
    assert json.loads((tmp_path / "g" / "quantize_config.json").read_text())["checkpoint_format"] == "gptq_v2"
    prov = config["sliderquant"]
    assert prov["checkpoint_format"] == "gptq_v2" and prov["method"] == "rtn"
    assert 0 < prov["scale_fp16_max_rel_error"] <= 2.0 ** -11


def test_symmetric_is_v1_with_zero_minus_one(tmp_path):
    model = quantized_tiny(4, 32, True)
    export(model, tmp_path / "g", format="gptq")
    t = load_file(tmp_path / "g" / "model.safetensors")
    qc = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert qc["checkpoint_format"] == "gptq" and qc["sym"] is True
    # z = 8 for every group, stored as 7 in each nibble; codes stored as q + 8
    assert u32(t["model.layers.0.self_attn.q_proj.qzeros"][0, 0]) == 0x77777777
    q = model.sliderquant_state["tensors"]["model.layers.0.self_attn.q_proj.qweight"]
    word = nibbles(int(q[0, i]) + 8 for i in range(8))
    assert u32(t["model.layers.0.self_attn.q_proj.qweight"][0, 0]) == word


def test_refusals_write_nothing(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="5-bit codes cannot be stored"):
        export(quantized_tiny(5, 32), out, format="gptq")
    with pytest.raises(ValueError, match=r"one group size per model.*g48: 3 layers, e\.g\. "
                                         r"model\.layers\.0\.mlp\.down_proj; per channel: 18 layers"):
        export(quantized_tiny(4, 64), out, format="gptq")
    with pytest.raises(ValueError, match=r"zero points.*model\.layers\.1\.mlp\.down_proj: 3\b"):
        export(quantized_tiny(4, 32, positive_group=True), out, format="gptq")
    torch.manual_seed(0)
    odd = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=100,
                                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    sliderquant.quantize(odd, {"method": "rtn", "wbits": 4, "group_size": None}, None)
    with pytest.raises(ValueError, match=r"3 layers are not a whole number of 32-bit words.*mlp\.gate_proj "
                                         r"\(100x64\)"):
        export(odd, out, format="gptq")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def smollm2():
    from sliderquant import data
    return data.load_model("smollm2-135m")


def test_smollm2_rtn_g64_w4(tmp_path, smollm2):
    fp, tok = smollm2
    model = copy.deepcopy(fp)
    sliderquant.quantize(model, {"method": "rtn", "wbits": 4, "group_size": 64}, None)
    export(model, tmp_path / "smol", format="gptq", tokenizer=tok)
    reader = read_quantized(tmp_path / "smol", gptq_config(4))
    ids = tok("The capital of France is Paris, and the capital of Germany is", return_tensors="pt").input_ids
    diff16, diff = check_against_reader(model, reader, ids, ("model.layers.0.self_attn.q_proj",
                                                             "model.layers.29.mlp.down_proj"),
                                         logit_tol=5e-3)
    print(f"SmolLM2 W4 g64 GPTQ: max |logit diff| vs fq16 {diff16:.3g}, vs fp32-scale fq {diff:.3g}")
