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
