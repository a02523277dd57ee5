"""``python -m sliderquant.bench``: the calibration benchmark measures what it says (on the tiny real Llama)."""

import math

import pytest
import torch

from c_extension import require_c
from conftest import require_asset
from sliderquant import bench


@pytest.fixture(scope="module")
def rows():
    require_c()
    require_asset("stories260k")
    n = torch.get_num_threads()
    try:
        return bench.bench_calibrate("stories260k", nsamples=4, seqlen=64, batch_size=2, windows=((0, 1), (3, 4)),
                                     threads=1, precisions=("fp32", "bf16"), reps=2, profile=True)
    finally:
        torch.set_num_threads(n)


def test_calibrate_rows_are_consistent(rows):
    assert [(r["precision"], r["window"]) for r in rows] == [("fp32", "0-1"), ("fp32", "3-4"),
                                                            ("bf16", "0-1"), ("bf16", "3-4")]
    for r in rows:
        for way, key in (("floor", "floor_s"), ("c", "c_s"), ("torch", "torch_s")):
            assert len(r["times"][way]) == 2 and all(t > 0 for t in r["times"][way])
            assert r[key] == pytest.approx(sum(r["times"][way]) / 2)     # the median of two rounds
        assert r["speedup"] == pytest.approx(r["torch_s"] / r["c_s"])
        assert r["overhead"] == pytest.approx(r["c_s"] / r["floor_s"] - 1)
        assert r["backend"] in ("avx2", "ref")


def test_calibrate_profile_sees_the_kernels_only_on_the_c_path(rows):
    """The split is from torch.profiler: only the C way runs sliderquant ops; the floor quantizes nothing
    and the torch way quantizes with plain aten ops."""
    for r in rows:
        prof = r["profile"]
        assert prof["c"]["quantization"] > 0
        assert prof["floor"]["quantization"] == 0 and prof["torch"]["quantization"] == 0
        for way in ("floor", "c", "torch"):
            assert prof[way]["matmul"] > 0 and all(math.isfinite(v) and v >= 0 for v in prof[way].values())


def test_auto_precision_is_what_quantize_uses():
    from sliderquant import engine
    from sliderquant.config import QuantConfig
    require_c()
    require_asset("stories260k")
    r = bench.bench_calibrate("stories260k", nsamples=2, seqlen=32, batch_size=2, windows=((0, 0),), threads=1,
                              precisions=("auto",), reps=1)
    assert r[0]["precision"] == engine.resolve_autocast(QuantConfig(), torch.device("cpu"))


def test_cli_rejects_unknown_precision(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["calibrate", "--precision", "fp16"])
    assert exc.value.code == 2
    assert "unknown precision" in capsys.readouterr().err


def test_kernels_quick_rows_for_the_autocast_dtype_pair():
    require_c()
    n = torch.get_num_threads()
    try:
        rows = bench.bench_kernels(reps=2, dtype=torch.float32, threads=1, quick=True, out_dtype=torch.bfloat16)
    finally:
        torch.set_num_threads(n)
    weight = [r for r in rows if r["kernel"].startswith("weight")]
    assert len(weight) == 4 and all("float32->bfloat16" in r["config"] for r in weight)
    for r in rows:
        assert r["c_ms"] > 0 and r["eager_ms"] > 0 and r["speedup"] == pytest.approx(r["eager_ms"] / r["c_ms"])
    fwd = next(r for r in weight if r["kernel"] == "weight_fwd")
    assert fwd["gbps"] == pytest.approx(1024 * 1024 * 6 / fwd["c_ms"] / 1e6)   # 4 bytes in, 2 bytes out


def test_threads_rows_and_no_busy_loop_left_behind():
    """``bench threads`` (smallest run): a row per config, load state and loop; busy loops are ended."""
    import subprocess
    from sliderquant import bench_threads
    require_c()
    configs = (bench_threads.CONFIGS[1],)                        # passive only
    before = set(subprocess.run(["pgrep", "-f", "while time.time"], capture_output=True, text=True).stdout.split())
    rows = bench_threads.bench_threads(calls=2, threads=1, load=1, reps=1, load_seconds=60, configs=configs)
    after = set(subprocess.run(["pgrep", "-f", "while time.time"], capture_output=True, text=True).stdout.split())
    assert after <= before
    assert sorted((r["state"], r["loop"]) for r in rows) == [("loaded", "kernel"), ("loaded", "matmul"),
                                                           ("quiet", "kernel"), ("quiet", "matmul")]
    for r in rows:
        assert r["config"] == "passive" and len(r["times"]) == 1 and r["median_s"] > 0
        assert r["load_processes"] == (1 if r["state"] == "loaded" else 0) and len(r["loadavg"][0]) == 3


# ---- bench infer: llama.cpp decode rows (stories260K, tiny settings) ------------------------------
def _infer_args(*extra):
    import argparse
    from sliderquant import bench_infer
    return bench_infer.add_args(argparse.ArgumentParser()).parse_args(
        ["--model", "stories260k", "--shapes", "64x128", "--batches", "1", "--bits", "4", "--working-set-mib", "1",
         "--rounds", "1", "--decode-rounds", "1", "--threads", "1", *extra])


def _run_infer(*extra):
    from sliderquant import bench_infer
    n = torch.get_num_threads()
    try:
        return bench_infer.run(_infer_args(*extra))
    finally:
        torch.set_num_threads(n)


def test_infer_llama_cpp_rows_beside_ours(capsys):
    """W4 g128 RTN on stories260K (64-wide rows per channel -> Q4_1; the 172-wide down_proj -> F16), 8 new
    tokens: both llama.cpp rows are there, timed, labelled, and greedy llama.cpp repeats its tokens."""
    from sliderquant import bench_infer
    from test_export_gguf import require_module
    require_c()
    require_asset("stories260k")
    require_module("cyllama")
    rows = _run_infer("--decode-tokens", "8")
    decode = {r["impl"]: r for r in rows if r["kind"] == "decode"}
    assert list(decode) == ["bf16 model", "packed W4 model", "packed W4, torch head", "llama.cpp Q4_1", "llama.cpp F16"]
    # same model, head through F.linear: the same greedy tokens
    assert decode["packed W4, torch head"]["first_tokens"] == decode["packed W4 model"]["first_tokens"]
    for impl in ("llama.cpp Q4_1", "llama.cpp F16"):
        r = decode[impl]
        assert r["tokens_per_s"] > 0 and r["generation_tokens_per_s"] > 0 and r["prompt_ms"] > 0
        assert r["new_tokens"] == 8 and r["generation_tokens"] == 7 and r["threads"] == 1
        assert "cyllama 0.2.18" in r["reader"] and r["reader"].startswith("llama.cpp ggml ")
        assert r["same_tokens_every_round"] and len(r["first_tokens"]) == 8     # warm-up and round: same tokens
    assert decode["llama.cpp Q4_1"]["gguf_types"] == "Q4_1+F16" and decode["llama.cpp F16"]["gguf_types"] == "F16"
    assert decode["llama.cpp Q4_1"]["decoder_linear_bytes"] < decode["llama.cpp F16"]["decoder_linear_bytes"]
    assert decode["llama.cpp Q4_1"]["speedup_vs_f16"] == pytest.approx(
        decode["llama.cpp Q4_1"]["tokens_per_s"] / decode["llama.cpp F16"]["tokens_per_s"])
    ours = decode["packed W4 model"]
    assert ours["tokens_per_s_ratio_to"]["llama.cpp Q4_1"] == pytest.approx(
        ours["tokens_per_s"] / decode["llama.cpp Q4_1"]["tokens_per_s"])
    bench_infer.print_table(rows)
    out = capsys.readouterr().out
    assert "decode stories260k llama.cpp Q4_1" in out and "generation alone" in out


def test_infer_llama_cpp_f16_greedy_is_repeatable_and_agrees_with_transformers(tmp_path):
    """The F16 baseline file is the unquantized model: llama.cpp's first greedy token on it is
    transformers' on the fp32 model, and a second decode gives the same 8 tokens."""
    from sliderquant import bench_infer, data
    from test_export_gguf import require_module
    require_asset("stories260k")
    require_module("cyllama")
    model, tok = data.load_model("stories260k")
    path = str(tmp_path / "f16.gguf")
    summary = bench_infer.export_float_gguf(model, tok, path)
    assert summary["type_counts"] == {"F16": 1 + 7 * 5, "F32": 1 + 2 * 5}
    assert getattr(model, "sliderquant_state", None) is None          # the stand-in state is gone
    ids = tok("The history of the city begins", return_tensors="pt").input_ids
    with torch.no_grad():
        first = int(model(ids).logits[0, -1].argmax())
    dec = bench_infer.LlamaCppDecode(path, ids[0].tolist(), 8, 1)
    try:
        a, b = dec(), dec()
    finally:
        dec.close()
    assert a == b and len(a) == 8
    assert a[0] == first


def test_infer_without_cyllama_says_why(monkeypatch, capsys):
    """No cyllama: the torch rows as before, and one line saying why the llama.cpp rows are missing."""
    import sys
    from sliderquant import bench_infer
    require_c()
    require_asset("stories260k")
    monkeypatch.setitem(sys.modules, "cyllama", None)       # find_spec("cyllama") -> None: not installed
    rows = _run_infer("--decode-tokens", "2")
    assert [r["impl"] for r in rows if r["kind"] == "decode"] == ["bf16 model", "packed W4 model", "packed W4, torch head"]
    bench_infer.print_table(rows)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "llama.cpp" in ln]
    assert lines == ["decode stories260k llama.cpp rows skipped: cyllama is not installed "
                     "(pip install cyllama==0.2.18 brings llama.cpp)"]
