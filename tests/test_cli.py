"""The command line on the real tiny model: eval prints one table for several datasets."""

import json
import subprocess
import sys

import pytest

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
