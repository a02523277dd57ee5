"""examples/compare_peers.py: the grid check on hand-built weights, and a smoke run on stories260K
(fp, rtn and, when auto-round is installed, its light recipe at 2 iterations) whose rows land in the
JSON file and are skipped on a rerun."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import require_asset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "compare_peers.py")


def _load_script():
    spec = importlib.util.spec_from_file_location("compare_peers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


peers = _load_script()


def _on_grid(out_f, in_f, bits, group, symmetric=False, seed=0):
    """A weight built as ``(q - z) * s`` from random codes, with its scales and zero points."""
    gen = torch.Generator().manual_seed(seed)
    g = in_f if group is None else group
    n_groups = -(-in_f // g)
    s = torch.rand(out_f, n_groups, generator=gen) * 0.05 + 1e-3
    if symmetric:
        q = torch.randint(-2 ** (bits - 1), 2 ** (bits - 1), (out_f, in_f), generator=gen).float()
        z = torch.zeros(out_f, n_groups)
    else:
        q = torch.randint(0, 2 ** bits, (out_f, in_f), generator=gen).float()
        z = torch.randint(-2, 2 ** bits + 2, (out_f, n_groups), generator=gen).float()   # z may leave the code range
    cols = torch.arange(in_f) // g
    w = (q - z[:, cols]) * s[:, cols]
    return w, s, z


@pytest.mark.parametrize("group", [None, 16, 24])      # per channel, tiling groups, a short last group (40 = 24 + 16)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_grid_check_passes_on_grid_and_catches_one_ulp(bits, group):
    w, s, z = _on_grid(6, 40 if group == 24 else 48, bits, group)
    assert peers.grid_violations(w, s, z, bits, group) == 0
    for r, c in ((0, 0), (3, 17), (5, w.shape[1] - 1)):
        off = w.clone()
        off[r, c] = torch.nextafter(off[r, c], torch.tensor(float("inf")))      # one ulp up
        assert peers.grid_violations(off, s, z, bits, group) == 1
        off = w.clone()
        off[r, c] = torch.nextafter(off[r, c], torch.tensor(float("-inf")))     # one ulp down
        assert peers.grid_violations(off, s, z, bits, group) == 1


def test_grid_check_catches_codes_out_of_range_and_non_integer_zero_points():
    w, s, z = _on_grid(4, 32, 3, 16)
    # one step beyond the top code: exactly a grid point of the scale, but q = 2^bits
    top = w.clone()
    top[1, 3] = (7 + 1 - z[1, 0]) * s[1, 0]
    assert peers.grid_violations(top, s, z, 3, 16) == 1
    assert peers.grid_violations(top, s, z, 4, 16) == 0         # the same weight is on the 4-bit grid
    half = z.clone()
    half[2, 1] += 0.5
    assert peers.grid_violations(w, s, half, 3, 16) == 16        # every weight of that group
    sym_w, sym_s, _ = _on_grid(4, 32, 3, None, symmetric=True)
    assert peers.grid_violations(sym_w, sym_s, None, 3, None, symmetric=True) == 0
    assert peers.grid_violations(sym_w, sym_s, None, 3, None, symmetric=False) > 0   # negative codes
    with pytest.raises(ValueError, match="one value per row and group"):
        peers.grid_violations(w, s, z, 3, 8)


def _run(tmp_path, *extra):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, SCRIPT, "--setting", "w3g64", "--model", "stories260k", "--nsamples", "8",
           "--seqlen", "32", "--windows", "2", "--eval-seqlen", "64", "--iters", "2", "--autoround-compile", "off",
           "--threads", "1", "--out-dir", str(tmp_path / "results"), "--work-dir", str(tmp_path / "work"), *extra]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_smoke_run_on_stories260k_writes_rows_and_skips_them_on_rerun(tmp_path):
    for name in ("stories260k", "c4_validation_2k.parquet", "wikitext2_test.txt"):
        require_asset(name)
    methods = ["fp", "rtn"]
    if importlib.util.find_spec("auto_round") is not None:
        methods.append("autoround-light")
    first = _run(tmp_path, "--methods", ",".join(methods))
    assert "skipping" not in first
    path = tmp_path / "results" / "peers_w3g64.json"
    res = json.loads(path.read_text())
    assert res["setting"] == "w3g64" and res["protocol"]["model"] == "stories260k"
    assert res["protocol"]["nsamples"] == 8 and res["protocol"]["windows"] == 2
    assert res["sources"]["calibration"].startswith("c4 (offline assets")
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == methods
    for m, r in rows.items():
        assert r["ppl_wikitext2"] > 1 and r["ppl_c4"] > 1
        assert r["peak_rss_mib"] > 0 and len(r["load_before"]) == 3 and len(r["load_after"]) == 3
        assert "compare_peers.py --setting w3g64" in r["command"]
        assert r["versions"]["torch"] == torch.__version__
    assert rows["fp"]["quantize_s"] is None and "grid" not in rows["fp"]
    # rtn quantizes all 5 x 7 linears, every weight on the 3-bit grid, and does worse than fp
    assert rows["rtn"]["grid"]["checked"] == rows["rtn"]["grid"]["linears"] == 35
    assert rows["rtn"]["grid"]["off_grid"] == 0
    assert rows["rtn"]["ppl_wikitext2"] > rows["fp"]["ppl_wikitext2"]
    if "autoround-light" in rows:
        ar = rows["autoround-light"]
        assert ar["tool"].startswith("auto-round") and ar["budget"].startswith("2 iters, lr 0.005, batch 8")
        # auto-round leaves in FP the linears with a dimension not divisible by 32 (stories' 172-wide MLP)
        assert 0 < ar["grid"]["checked"] <= ar["grid"]["linears"] and ar["grid"]["off_grid"] == 0
        assert ar["versions"]["auto-round"]
    table = (tmp_path / "results" / "peers.md").read_text()
    assert "| rtn | sliderquant |" in table and "Commands:" in table and "torch 2." in table

    again = _run(tmp_path, "--methods", ",".join(methods))
    for m in methods:
        assert f"{m}: already in" in again
    assert "[1/" not in again
    assert json.loads(path.read_text()) == res

    (tmp_path / "results" / "peers.md").unlink()
    assert "wrote" in _run(tmp_path, "--table-only")
    assert (tmp_path / "results" / "peers.md").read_text() == table


def test_missing_method_preset_is_a_clear_skip_line(tmp_path, capsys):
    args = peers.parse_args(["--setting", "w2g64", "--methods", "fp,sliderquant-fast",
                             "--fast-config", str(tmp_path / "nope.yaml")])
    assert peers.chosen_methods(args) == ["fp"]
    assert f"skipping sliderquant-fast: no fast preset {tmp_path / 'nope.yaml'}" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown method"):
        peers.chosen_methods(peers.parse_args(["--setting", "w4", "--methods", "fp,awq"]))
