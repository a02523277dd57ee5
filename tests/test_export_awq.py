"""AWQ gemm export: transformers' AWQ loader (through gptqmodel, its pure-torch AWQ kernel) against
our fake-quantized model with fp16 scales, AWQ's interleaved words by hand, and refusals.
Tolerances as in test_export_gptq.py (fp16 scales, weights dequantized in fp16)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from sliderquant.export import export
from sliderquant.export.awq import ORDER
from test_export_ct import UP_PROJ, exported_by_hand, nibbles, quantized_tiny, u32
from test_export_gptq import NAMES, check_against_reader, read_quantized
from test_models import token_ids


def awq_config():
    from transformers import AwqConfig
    return AwqConfig(bits=4, backend="torch_awq")      # gptqmodel's pure-torch AWQ kernel


def test_reader_gives_our_logits(tmp_path):
    model = quantized_tiny(4, 32, False)
    export(model, tmp_path / "awq", format="awq")
    reader = read_quantized(tmp_path / "awq", awq_config())
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

    def dequant(m):   # what AwqTorchLinear.forward multiplies by, (in, out) fp16
        return dequantize_gemm(qweight=m.qweight, qzeros=m.qzeros, scales=m.scales, bits=m.bits,
                               group_size=m.group_size)
    # this kernel also casts activations to fp16; the logit bound of test_export_gptq still holds
    check_against_reader(model, reader, token_ids(), NAMES, dequant)


def test_interleaved_words_by_hand(tmp_path):
    assert ORDER == (0, 2, 4, 6, 1, 3, 5, 7)
    t, q, s, z = exported_by_hand(tmp_path / "a", "awq")
    name = UP_PROJ
    assert t[f"{name}.qweight"].shape == (64, 12) and t[f"{name}.qzeros"].shape == (2, 12)
    # word 2 of input row 5: output columns 16..23, nibble k holding column 16 + ORDER[k]
    assert u32(t[f"{name}.qweight"][5, 2]) == nibbles(q[16 + c, 5] for c in (0, 2, 4, 6, 1, 3, 5, 7))
    assert u32(t[f"{name}.qzeros"][1, 1]) == nibbles(z[8 + c, 1] for c in (0, 2, 4, 6, 1, 3, 5, 7))
    assert torch.equal(t[f"{name}.scales"], s.t().half())
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": 32,
                                             "zero_point": True, "version": "gemm",
                                             "modules_to_not_convert": ["lm_head"]}
    assert config["sliderquant"]["format"] == "awq"
    assert json.loads((tmp_path / "a" / "quant_config.json").read_text())["version"] == "GEMM"


@pytest.mark.parametrize("kwargs,message", [
    (dict(bits=3), "3-bit codes cannot be stored"),
    (dict(symmetric=True), "quantized symmetrically"),
    (dict(group_size=None), "per channel"),
    (dict(group_size=64), "one group size per model"),
    (dict(positive_group=True), r"model\.layers\.1\.mlp\.down_proj: 3\b"),
])
def test_refusals_write_nothing(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        export(quantized_tiny(**kwargs), tmp_path / "out", format="awq")
    assert list(tmp_path.iterdir()) == []
