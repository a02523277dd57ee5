"""The work-directory state file: every corruption and inconsistency is refused with a sentence.

Oracle: states written by ``WorkDir.save`` and then damaged by hand (a flipped byte at chosen and
at random positions, a truncation, a hand-made payload with a valid hash but wrong contents).
"""

import hashlib
import random

import pytest
import torch

from sliderquant.checkpoint import MAGIC, WorkDir, WorkDirError, encode_state, read_state

FP = "fingerprint-of-this-run"


def learned():
    g = torch.Generator().manual_seed(0)
    return {f"{i}.self_attn.q_proj": {"lwc_upper": torch.randn(8, 2, generator=g),
                                      "lora_a": torch.randn(4, 16, generator=g)} for i in range(2)}


def like():
    return {k: {n: torch.zeros_like(t) for n, t in v.items()} for k, v in learned().items()}


def table(n):
    return [{"stage": 0, "window": [k], "loss_before": 1.0, "loss_after": 0.5} for k in range(n)]


@pytest.fixture
def work(tmp_path):
    w = WorkDir(str(tmp_path / "work"), FP)
    w.save(3, learned(), table(3), total=8)
    return w


def test_round_trip(work):
    state = work.load(total=8, like=like())
    assert state["done"] == 3 and state["total"] == 8 and len(state["table"]) == 3
    for name, tensors in learned().items():
        for key, t in tensors.items():
            assert torch.equal(state["learned"][name][key], t)
    assert WorkDir(str(work.path) + "-fresh", FP).load() is None


def test_flipped_byte_in_the_learned_tensors_is_refused(work):
    """The case that used to pass silently: a changed value in a learned tensor."""
    blob = bytearray(open(work.state_path, "rb").read())
    raw = learned()["1.self_attn.q_proj"]["lora_a"].numpy().tobytes()
    at = bytes(blob).find(raw)
    assert at > 0                       # the tensor's bytes are in the file as they are
    blob[at + 5] ^= 0x01
    open(work.state_path, "wb").write(blob)
    with pytest.raises(WorkDirError, match="integrity check.*delete it"):
        work.load(total=8)


def test_any_flipped_byte_is_refused(work):
    good = open(work.state_path, "rb").read()
    positions = [0, len(MAGIC) - 1, len(MAGIC), len(MAGIC) + 63, len(MAGIC) + 64, len(MAGIC) + 65,
                 len(good) // 2, len(good) - 1]
    positions += random.Random(1).sample(range(len(good)), 40)
    for pos in positions:
        for bit in (0x01, 0x80):
            bad = bytearray(good)
            bad[pos] ^= bit
            open(work.state_path, "wb").write(bad)
            with pytest.raises(WorkDirError):
                work.load(total=8)


@pytest.mark.parametrize("keep", [0, 10, len(MAGIC) + 30, -1, -200])
def test_truncated_file_is_refused(work, keep):
    good = open(work.state_path, "rb").read()
    open(work.state_path, "wb").write(good[:keep] if keep >= 0 else good[:len(good) + keep])
    with pytest.raises(WorkDirError, match="delete it"):
        work.load(total=8)


def test_old_or_foreign_file_is_refused(work):
    torch.save({"fingerprint": FP, "done": 3, "learned": learned(), "table": table(3)}, work.state_path)
    with pytest.raises(WorkDirError, match="not a sliderquant work state"):
        work.load()


@pytest.mark.parametrize("done, total, match", [
    (9, 8, r"9 completed windows is outside \[0, 8\]"),
    (-1, 8, r"outside \[0, 8\]"),
    (2.5, 8, "outside"),
])
def test_done_outside_the_run_is_refused(tmp_path, done, total, match):
    w = WorkDir(str(tmp_path), FP)
    n = int(done) if done >= 0 else 0
    w.save(done, learned(), table(n), total=total)
    with pytest.raises(WorkDirError, match=match):
        w.load(total=total)


def test_done_is_checked_against_this_runs_window_count(tmp_path):
    w = WorkDir(str(tmp_path), FP)
    w.save(12, learned(), table(12))                 # written without a total
    with pytest.raises(WorkDirError, match=r"outside \[0, 8\]"):
        w.load(total=8)
    w.save(6, learned(), table(6), total=10)
    with pytest.raises(WorkDirError, match="written for 10 windows, this run has 8"):
        w.load(total=8)


def test_table_must_match_done(tmp_path):
    w = WorkDir(str(tmp_path), FP)
    w.save(4, learned(), table(2), total=8)
    with pytest.raises(WorkDirError, match="one row per completed window"):
        w.load(total=8)


def _write_payload(path, state):
    """A file with a valid hash around an arbitrary payload (what a buggy writer could produce)."""
    open(path, "wb").write(encode_state(state))


def test_missing_keys_are_named(tmp_path):
    w = WorkDir(str(tmp_path), FP)
    _write_payload(w.state_path, {"fingerprint": FP, "done": 1, "total": 8, "table": table(1)})
    with pytest.raises(WorkDirError, match="lacks learned"):
        w.load(total=8)
    _write_payload(w.state_path, [1, 2, 3])
    with pytest.raises(WorkDirError, match="mapping"):
        w.load(total=8)


def test_hash_is_sha256_of_the_payload(work):
    blob = open(work.state_path, "rb").read()
    head = len(MAGIC)
    assert blob[head:head + 64].decode() == hashlib.sha256(blob[head + 65:]).hexdigest()
    assert read_state(work.state_path)["done"] == 3


def test_learned_tensors_must_match_the_model(work):
    expected = like()
    expected["2.self_attn.q_proj"] = expected["0.self_attn.q_proj"]
    with pytest.raises(WorkDirError, match="does not match this model's quantized linears.*2.self_attn"):
        work.load(total=8, like=expected)
    expected = like()
    expected["0.self_attn.q_proj"]["lora_a"] = torch.zeros(4, 32)
    with pytest.raises(WorkDirError, match=r"0.self_attn.q_proj.lora_a is torch.float32 \(4, 16\).*\(4, 32\)"):
        work.load(total=8, like=expected)
    expected = like()
    expected["0.self_attn.q_proj"]["lwc_upper"] = torch.zeros(8, 2, dtype=torch.float64)
    with pytest.raises(WorkDirError, match="float64"):
        work.load(total=8, like=expected)
    expected = like()
    del expected["1.self_attn.q_proj"]["lora_a"]
    with pytest.raises(WorkDirError, match="learned tensors"):
        work.load(total=8, like=expected)


def test_state_of_another_run_is_refused(work):
    with pytest.raises(WorkDirError, match="different run"):
        WorkDir(work.path, "another-fingerprint").load()
