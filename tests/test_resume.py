"""Resume: kill a run after a window, rerun it, get bitwise the weights of an uninterrupted run."""

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import logging
    import sys
    import torch
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    import sliderquant
    from test_models import tiny_model, token_ids
    work, out, wbits = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model = tiny_model("llama")
    cfg = dict(wbits=wbits, epochs=4, batch_size=2, nsamples=6, seqlen=16)
    sliderquant.quantize(model, cfg, token_ids(), work_dir=None if work == "-" else work)
    torch.save({{k: v for k, v in model.state_dict().items()}}, out)
""")


def run(tmp_path, work, out, wbits=2, exit_after=None):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=os.path.join(ROOT, "tests")))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("SLIDERQUANT_TEST_EXIT_AFTER_STEP", None)
    if exit_after is not None:
        env["SLIDERQUANT_TEST_EXIT_AFTER_STEP"] = str(exit_after)
    return subprocess.run([sys.executable, str(script), str(work), str(out), str(wbits)], env=env,
                          capture_output=True, text=True, timeout=300)


def quantize_here(work, wbits=2, epochs=4):
    import sliderquant
    from test_models import tiny_model, token_ids
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tiny_model("llama")
        cfg = dict(wbits=wbits, epochs=epochs, batch_size=2, nsamples=6, seqlen=16)
        return sliderquant.quantize(model, cfg, token_ids(), work_dir=work)
    finally:
        torch.set_num_threads(n)


def test_killed_run_resumes_to_identical_weights(tmp_path):
    work = tmp_path / "work"
    # 8 steps in all (4 windows x 2 stages): die in the middle of stage 2, after window [0,1]
    killed = run(tmp_path, work, tmp_path / "never.pt", exit_after=6)
    assert killed.returncode == 17, killed.stderr
    assert not (tmp_path / "never.pt").exists()
    state = torch.load(work / "state.pt", weights_only=True)
    assert state["done"] == 6
    # rerun in this process (same thread count, same code path): it continues after window 6
    logger = logging.getLogger("sliderquant.engine")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        b = quantize_here(str(work)).state_dict()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert any("after 6 of 8 windows" in r.getMessage() for r in records)
    assert torch.load(work / "state.pt", weights_only=True)["done"] == 8
    a = quantize_here(None).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # ...and differs from a run that learned nothing (the comparison is not vacuous)
    c = quantize_here(None, epochs=0).state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)

    # a work dir from a different config is refused
    with pytest.raises(RuntimeError, match="different run"):
        quantize_here(str(work), wbits=3)
