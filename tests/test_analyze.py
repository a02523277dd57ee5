"""Layer sensitivity (``sliderquant analyze``): one decoder layer at a time, RTN."""

from __future__ import annotations

import copy
import csv
import math

import pytest
import torch

from conftest import require_asset
from sliderquant import analyze, reference
from sliderquant.cli import main
from sliderquant.models import UnsupportedModelError, decoder_layers, layer_linears

torch.set_num_threads(1)


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tiny():
    model = _tiny_llama()
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(1))
    return model, ids


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_rows_kl_and_exact_restore(tiny, tmp_path):
    model, ids = tiny
    before = _logits(model, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    res = analyze.layer_sensitivity(model, ids, 2, group_size=32, batch_size=2, progress=False)
    # the model is bitwise what it was
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(_logits(model, ids), before)

    assert [r.layer for r in res.rows] == [0, 1, 2]
    for r in res.rows:
        assert r.kl >= 0 and math.isfinite(r.kl)
        assert r.rel_output_error > 0
        assert r.ppl_increase == pytest.approx(r.ppl - res.fp_ppl)
    # the fp perplexity agrees with the model's own forward (the analysis runs the layers itself)
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert res.fp_ppl == pytest.approx(math.exp(loss), rel=1e-4)

    paths = analyze.write_outputs(res, tmp_path, "tiny")
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(decoder_layers(model))
    assert tuple(rows[0]) == analyze.CSV_FIELDS
    assert all(float(r["kl"]) >= 0 for r in rows)
    assert paths["png"].stat().st_size > 1000


def test_rel_output_error_matches_hand_check(tiny):
    """Layer 1 quantized with the plain-torch reference, its output captured by a hook in the model's forward."""
    model, ids = tiny
    bits, g, i = 3, 16, 1
    res = analyze.layer_sensitivity(model, ids, bits, group_size=g, progress=False)

    def output_of_layer(m):
        out = {}
        h = decoder_layers(m)[i].register_forward_hook(
            lambda mod, a, o: out.__setitem__("y", o[0] if isinstance(o, tuple) else o))
        with torch.no_grad():
            m(ids)
        h.remove()
        return out["y"]

    y_fp = output_of_layer(model)
    qmodel = copy.deepcopy(model)
    layer = decoder_layers(qmodel)[i]
    with torch.no_grad():
        for lin in layer_linears(qmodel, layer).values():
            lin.weight.copy_(reference.fake_quant_weight(lin.weight, bits, group_size=g))
    y_q = output_of_layer(qmodel)      # layers 0..i-1 are fp: the input of layer i is the fp one
    expected = (torch.linalg.vector_norm(y_q - y_fp) / torch.linalg.vector_norm(y_fp)).item()
    assert res.rows[i].rel_output_error == pytest.approx(expected, rel=1e-4)
    per_tok = (torch.linalg.vector_norm(y_q - y_fp, dim=-1) / torch.linalg.vector_norm(y_fp, dim=-1)).mean().item()
    assert res.rows[i].rel_output_error_tok == pytest.approx(per_tok, rel=1e-4)

    # and the end-to-end KL of that layer against the quantized copy's own logits
    lp = torch.log_softmax(_logits(model, ids).double(), -1)
    lq = torch.log_softmax(_logits(qmodel, ids).double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    assert res.rows[i].kl == pytest.approx(kl, rel=1e-3, abs=1e-6)


def test_errors(tiny):
    model, ids = tiny
    for bits in (1, 9, 0, 2.5):
        with pytest.raises(ValueError, match="wbits"):
            analyze.layer_sensitivity(model, ids, bits, progress=False)
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).eval()
    with pytest.raises(UnsupportedModelError, match="not supported"):
        analyze.layer_sensitivity(gpt2, ids % 64, 2, progress=False)


def test_cli_on_stories260k(tmp_path, capsys):
    model_dir = require_asset("stories260k")
    out = tmp_path / "sens"
    rc = main(["analyze", "--model", str(model_dir), "--wbits", "2", "--group-size", "32",
               "--nsamples", "2", "--seqlen", "64", "--calib", "sample", "--out", str(out)])
    assert rc == 0
    with open(out / "sensitivity.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["layer"]) for r in rows] == list(range(5))     # stories260k has 5 layers
    assert all(float(r["kl"]) > 0 and float(r["ppl_increase"]) > 0 for r in rows)
    assert (out / "sensitivity.png").stat().st_size > 1000
    assert "| layer |" in capsys.readouterr().out
    # bits out of range: an error exit before anything is loaded
    assert main(["analyze", "--model", str(model_dir), "--wbits", "9", "--out", str(out)]) == 2
