"""compressed-tensors export: the reader itself (transformers + compressed-tensors) against our
fake-quantized model, the file layout by hand, refusals and all-or-nothing writing.

Tolerance of the reader comparisons: scales are stored in fp32 and the reader dequantizes
(q - z) * s in fp32 into an fp32 model, the same weights bit for bit as ours, so the logits are
expected equal; the bound is 1e-5 of the largest logit (observed: 0.0 everywhere).
"""

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import sliderquant
from conftest import require_asset
from sliderquant.export import export
from test_export_packing import require_reader
from test_models import tiny_model, token_ids

REL_TOL = 1e-5


def quantized_tiny(bits=4, group_size=32, symmetric=False, positive_group=False, family="llama"):
    model = tiny_model(family)
    if positive_group:
        # a group whose weights are all > 0: its clipped range excludes 0, so z < 0
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight[:3, :32] = torch.rand(3, 32) * 0.05 + 0.1
    sliderquant.quantize(model, {"method": "rtn", "wbits": bits, "group_size": group_size,
                                 "symmetric": symmetric}, None)
    return model


UP_PROJ = "model.layers.0.mlp.up_proj"                       # out 96, in 64, 2 groups of 32


def exported_by_hand(out_dir, fmt, symmetric=False):
    """A W4 g32 tiny model exported as ``fmt`` into ``out_dir``: the export's tensors and
    up_proj's codes, scales and zero points ``(t, q, s, z)``, for the layout tests."""
    model = quantized_tiny(4, 32, symmetric)
    export(model, out_dir, format=fmt)
    st = model.sliderquant_state["tensors"]
    q, s, z = (st[f"{UP_PROJ}.{p}"] for p in ("qweight", "scales", "zeros"))
    return load_file(out_dir / "model.safetensors"), q, s, z


def nibbles(codes) -> int:
    """The 32-bit word holding eight 4-bit ``codes``, the first one in the lowest nibble."""
    return sum(int(c) << (4 * k) for k, c in enumerate(codes))


def u32(word) -> int:
    """The bit pattern of a stored int32 word."""
    return int(word) & 0xFFFFFFFF


def read_ct(path):
    require_reader("compressed_tensors")
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                quantization_config=CompressedTensorsConfig(dequantize=True))


def assert_same_logits(ours, theirs, ids):
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    diff, scale = float((a - b).abs().max()), float(a.abs().max())
    assert diff <= REL_TOL * scale, f"max |logit diff| {diff} vs max |logit| {scale}"
    return diff


# (bits, group_size, symmetric): grouped/per-channel, symmetric/asymmetric, 2..8 bits incl. the
# straddling 3- and 5-bit streams
CASES = [(4, 32, False), (4, 32, True), (3, None, False), (2, 32, False), (5, 32, True),
         (8, None, True), (6, 32, False)]


@pytest.mark.parametrize("bits,group_size,symmetric", CASES)
def test_reader_gives_our_logits(tmp_path, bits, group_size, symmetric):
    model = quantized_tiny(bits, group_size, symmetric)
    export(model, tmp_path / "ct", format="compressed-tensors")
    reader = read_ct(tmp_path / "ct")
    assert_same_logits(model, reader, token_ids())
    # the reader really dequantized our codes: its weights are ours exactly
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.2.mlp.down_proj"):
        assert torch.equal(reader.get_submodule(name).weight, model.get_submodule(name).weight)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_other_families(tmp_path, family):
    # untied lm_head (kept dense, in ``ignore``), Qwen2's q/k/v biases, Qwen3's q/k norms
    model = quantized_tiny(4, 32, False, family=family)
    export(model, tmp_path / "ct", format="compressed-tensors")
    assert_same_logits(model, read_ct(tmp_path / "ct"), token_ids())


# group 64 on the tiny model gives two group sizes: the 64-wide inputs are per channel, the
# 96-wide down_proj uses 48 -- two config groups

def test_two_group_sizes_symmetric_load_in_transformers(tmp_path):
    require_reader("compressed_tensors")
    from transformers import AutoModelForCausalLM
    model = quantized_tiny(4, 64, True)
    export(model, tmp_path / "ct", format="compressed-tensors")
    reader = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    assert_same_logits(model, reader, token_ids())


def test_two_group_sizes_asymmetric_by_the_library_decompressor(tmp_path, caplog):
    # transformers 5.24 cannot load this file (see compressed_tensors.py); the library's own
    # decompressor, given each layer's config group, is the oracle
    require_reader("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    model = quantized_tiny(4, 64, False)
    with caplog.at_level("WARNING"):
        export(model, tmp_path / "ct", format="compressed-tensors")
    assert "cannot load it" in caplog.text
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    t = load_file(tmp_path / "ct" / "model.safetensors")
    compressor = BaseCompressor.get_value_from_registry("pack-quantized")
    schemes = [QuantizationScheme(**g) for g in qc["config_groups"].values()]
    for name in ("model.layers.1.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        (scheme,) = [sc for sc in schemes if any(tg == "Linear" or __import__("re").match(tg[3:], name)
                                                 for tg in sc.targets)]
        parts = {k[len(name) + 1:]: v for k, v in t.items() if k.startswith(name + ".")}
        weight = compressor.decompress(parts, scheme)["weight"]
        assert torch.equal(weight.float(), model.get_submodule(name).weight)


def test_two_group_sizes_are_two_config_groups(tmp_path):
    model = quantized_tiny(4, 64)
    export(model, tmp_path / "ct", format="compressed-tensors")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    groups = {json.dumps(g["targets"]): g["weights"] for g in qc["config_groups"].values()}
    assert groups[json.dumps(["re:.*\\.mlp\\.down_proj$"])]["group_size"] == 48
    assert groups[json.dumps(["re:.*\\.mlp\\.down_proj$"])]["strategy"] == "group"
    other = [w for t, w in groups.items() if "down_proj" not in t]
    assert len(other) == 1 and other[0]["strategy"] == "channel" and other[0]["group_size"] is None


def test_layout_by_hand(tmp_path):
    t, q, s, z = exported_by_hand(tmp_path / "ct", "compressed-tensors")
    name = UP_PROJ
    assert f"{name}.weight" not in t
    assert t[f"{name}.weight_packed"].shape == (96, 8) and t[f"{name}.weight_packed"].dtype == torch.int32
    # word 1 of row 5: codes 8..15 of that row, first one in the lowest nibble
    assert u32(t[f"{name}.weight_packed"][5, 1]) == nibbles(q[5, 8 + i] for i in range(8))
    # zero points packed along out: word 2 of group 1 holds rows 16..23
    assert t[f"{name}.weight_zero_point"].shape == (12, 2)
    assert u32(t[f"{name}.weight_zero_point"][2, 1]) == nibbles(z[16 + i, 1] for i in range(8))
    assert torch.equal(t[f"{name}.weight_scale"], s) and t[f"{name}.weight_scale"].dtype == torch.float32
    assert t[f"{name}.weight_shape"].tolist() == [96, 64]
    assert "lm_head.weight" not in t                           # tied to the embeddings
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["ignore"] == ["lm_head"]
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"]
    assert group["weights"] == {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
                                "group_size": 32, "dynamic": False}
    prov = config["sliderquant"]
    assert prov["tool"] == "sliderquant" and prov["method"] == "rtn" and prov["wbits"] == 4
    assert prov["group_size"] == 32 and prov["symmetric"] is False and prov["format"] == "compressed-tensors"


def test_symmetric_has_no_zero_point_and_loads_without_dequantize(tmp_path):
    require_reader("compressed_tensors")
    from transformers import AutoModelForCausalLM
    model = quantized_tiny(4, 32, True)
    export(model, tmp_path / "ct", format="compressed-tensors")
    t = load_file(tmp_path / "ct" / "model.safetensors")
    assert not any(k.endswith("weight_zero_point") for k in t)
    # symmetric codes are stored as q + 8
    q = model.sliderquant_state["tensors"]["model.layers.0.self_attn.q_proj.qweight"]
    word = nibbles(int(q[0, i]) + 8 for i in range(8))
    assert u32(t["model.layers.0.self_attn.q_proj.weight_packed"][0, 0]) == word
    # the reader's default (compressed, decompressed on the fly) path works for symmetric files
    reader = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    assert_same_logits(model, reader, token_ids())


def test_stories260k_per_channel_with_tokenizer(tmp_path):
    from sliderquant import data
    require_asset("stories260k")
    model, tok = data.load_model("stories260k")
    sliderquant.quantize(model, {"method": "rtn", "wbits": 4, "group_size": None}, None)
    export(model, tmp_path / "s", format="compressed-tensors", tokenizer=tok)
    reader = read_ct(tmp_path / "s")
    from transformers import AutoTokenizer
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "s")
    ids = tok2("Once upon a time there was a little girl", return_tensors="pt").input_ids
    assert ids.tolist() == tok("Once upon a time there was a little girl", return_tensors="pt").input_ids.tolist()
    assert_same_logits(model, reader, ids)


@pytest.fixture(scope="module")
def smollm2():
    from sliderquant import data
    return data.load_model("smollm2-135m")


@pytest.mark.parametrize("bits", [4, 2])
def test_smollm2_rtn_g64(tmp_path, smollm2, bits):
    fp, tok = smollm2
    model = copy.deepcopy(fp)
    sliderquant.quantize(model, {"method": "rtn", "wbits": bits, "group_size": 64}, None)
    export(model, tmp_path / "smol", format="compressed-tensors", tokenizer=tok)
    size = os.path.getsize(tmp_path / "smol" / "model.safetensors")
    assert size < 0.4 * sum(p.numel() * 4 for p in fp.parameters())   # fp32 embeddings dominate
    reader = read_ct(tmp_path / "smol")
    ids = tok("The capital of France is Paris, and the capital of Germany is", return_tensors="pt").input_ids
    assert_same_logits(model, reader, ids)


def test_verb_on_the_package(tmp_path):
    import sliderquant.export.packing as packing      # the package stays importable as a package
    assert callable(packing.pack_rows)
    model = quantized_tiny()
    assert sliderquant.export(model, tmp_path / "v", format="compressed-tensors") == str(tmp_path / "v")
    assert (tmp_path / "v" / "model.safetensors").exists()


def test_export_of_a_saved_and_loaded_model(tmp_path):
    model = quantized_tiny(3, 32, False)
    sliderquant.save(model, tmp_path / "saved")
    loaded = sliderquant.load(tmp_path / "saved")
    export(loaded, tmp_path / "ct", format="compressed-tensors")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["sliderquant"]["wbits"] == 3
    assert_same_logits(model, read_ct(tmp_path / "ct"), token_ids())


# ---- refusals and all-or-nothing writing ------------------------------------------------------------

def test_refusals_write_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="no sliderquant quantization state"):
        export(tiny_model("llama"), out, format="compressed-tensors")
    model = quantized_tiny(4, 32, positive_group=True)
    with pytest.raises(ValueError, match="unknown format 'onnx'"):
        export(model, out, format="onnx")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj: 3\b"):
        export(model, out, format="compressed-tensors")
    assert os.listdir(tmp_path) == []
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds other files"):
        export(quantized_tiny(), tmp_path / "busy", format="compressed-tensors")
    assert os.listdir(tmp_path / "busy") == ["notes.txt"]


def test_edited_weights_are_refused(tmp_path):
    model = quantized_tiny()
    with torch.no_grad():
        model.model.layers[2].self_attn.v_proj.weight[0, 0] += 1.0
    with pytest.raises(ValueError, match="v_proj no longer equals its quantized codes"):
        export(model, tmp_path / "x", format="compressed-tensors")
    assert not (tmp_path / "x").exists()


def test_failure_midway_leaves_nothing_and_keeps_earlier_export(tmp_path, monkeypatch):
    import safetensors.torch
    model = quantized_tiny()
    out = tmp_path / "ct"
    export(model, out, format="compressed-tensors")
    before = sorted(os.listdir(out))
    stamp = (out / "model.safetensors").read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export(model, out, format="compressed-tensors")
    assert sorted(os.listdir(tmp_path)) == ["ct"]                # no partial directory beside it
    assert sorted(os.listdir(out)) == before and (out / "model.safetensors").read_bytes() == stamp
    with pytest.raises(OSError, match="disk full"):
        export(model, tmp_path / "new", format="compressed-tensors")
    assert sorted(os.listdir(tmp_path)) == ["ct"]


def test_cli_export_and_quantize_format(tmp_path):
    from sliderquant import cli
    model = quantized_tiny(4, 32, False)
    sliderquant.save(model, tmp_path / "saved")
    assert cli.main(["export", "--model", str(tmp_path / "saved"), "--format", "compressed-tensors",
                     "--out", str(tmp_path / "ct")]) == 0
    assert_same_logits(model, read_ct(tmp_path / "ct"), token_ids())
    # a refusal is a clean error (non-zero exit status), and nothing is written
    sliderquant.save(quantized_tiny(3, 32, False), tmp_path / "saved3")
    assert cli.main(["export", "--model", str(tmp_path / "saved3"), "--format", "awq",
                     "--out", str(tmp_path / "awq")]) != 0
    assert not (tmp_path / "awq").exists()


def test_cli_quantize_with_format(tmp_path):
    from sliderquant import cli
    src = require_asset("stories260k")
    out = tmp_path / "q"
    assert cli.main(["quantize", "--model", str(src), "--method", "rtn", "--wbits", "4", "--group-size",
                     "channel", "--out", str(out), "--format", "compressed-tensors"]) == 0
    model = sliderquant.load(out)
    config = json.loads((tmp_path / "q-compressed-tensors" / "config.json").read_text())
    assert config["sliderquant"]["method"] == "rtn" and config["sliderquant"]["group_size"] is None
    assert (tmp_path / "q-compressed-tensors" / "tokenizer_config.json").exists()
    assert_same_logits(model, read_ct(tmp_path / "q-compressed-tensors"), token_ids())
