"""Resume: kill a run after a window, rerun it, get bitwise the weights of an uninterrupted run;
a damaged or inconsistent work directory is refused instead of silently changing the result."""

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sliderquant.checkpoint import WorkDirError, encode_state, read_state

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
    work, out, wbits, exit_after = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    import os

    def die_after(done, total, row):
        # a hard kill right after the state of window `done` was written (no cleanup, no flush)
        if done == exit_after:
            os._exit(17)

    model = tiny_model("llama")
    cfg = dict(wbits=wbits, epochs=4, batch_size=2, nsamples=6, seqlen=16)
    sliderquant.quantize(model, cfg, token_ids(), work_dir=None if work == "-" else work,
                         on_window=die_after)
    torch.save({{k: v for k, v in model.state_dict().items()}}, out)
""")


def run(tmp_path, work, out, wbits=2, exit_after=None):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=os.path.join(ROOT, "tests")))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(script), str(work), str(out), str(wbits),
                           str(-1 if exit_after is None else exit_after)], env=env,
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
    state = read_state(work / "state.pt")
    assert state["done"] == 6 and len(state["table"]) == 6
    # rerun in this process (same thread count, same code path): it continues after window 6
    logger = logging.getLogger("sliderquant")     # the engine logs under it, wherever it lives
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
    assert read_state(work / "state.pt")["done"] == 8
    a = quantize_here(None).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # ...and differs from a run that learned nothing (the comparison is not vacuous)
    c = quantize_here(None, epochs=0).state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)

    # a work dir from a different config is refused
    with pytest.raises(WorkDirError, match="different run"):
        quantize_here(str(work), wbits=3)


def test_flipped_byte_in_the_state_is_refused_on_resume(tmp_path):
    """It used to be loaded as is (or to fail with a raw RuntimeError deep in torch)."""
    work = tmp_path / "work"
    quantize_here(str(work), epochs=1)
    path = work / "state.pt"
    good = path.read_bytes()
    for pos in (len(good) // 3, len(good) // 2, len(good) - 100):
        bad = bytearray(good)
        bad[pos] ^= 0x04
        path.write_bytes(bad)
        with pytest.raises(ValueError, match="integrity check.*delete it"):
            quantize_here(str(work), epochs=1)
    path.write_bytes(good[:len(good) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        quantize_here(str(work), epochs=1)


def test_window_count_outside_the_run_is_refused(tmp_path):
    """A state (with a valid hash) claiming more windows than the run has used to end the run
    at once with whatever it held."""
    work = tmp_path / "work"
    quantize_here(str(work), epochs=1)
    state = read_state(work / "state.pt")
    state["done"] = 99
    state["table"] = state["table"] * 13       # keep one row per claimed window: only the count is wrong
    state["table"] = state["table"][:99]
    (work / "state.pt").write_bytes(encode_state(state))
    with pytest.raises(ValueError, match=r"99 completed windows is outside \[0, 8\]"):
        quantize_here(str(work), epochs=1)


def test_learned_tensors_of_another_shape_are_refused(tmp_path):
    work = tmp_path / "work"
    quantize_here(str(work), epochs=1)
    state = read_state(work / "state.pt")
    first = sorted(state["learned"])[0]
    state["learned"][first]["lora_a"] = state["learned"][first]["lora_a"][:, :-1]
    (work / "state.pt").write_bytes(encode_state(state))
    with pytest.raises(ValueError, match=f"{first}.lora_a is"):
        quantize_here(str(work), epochs=1)
