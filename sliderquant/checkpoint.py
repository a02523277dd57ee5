"""Resumable work directory: the learned state after each completed window, integrity-checked.

One file, ``state.pt``, rewritten atomically (temporary file, fsync, ``os.replace``) after every
window.  Its layout::

    b"sliderquant-state 2\\n"        magic line (format version)
    <64 hex digits>\\n                sha256 of the payload
    <payload>                        torch.save of {"fingerprint", "done", "total", "learned", "table"}

``done`` counts the completed (stage, window) steps out of ``total``, ``learned`` maps each
quantized linear to its learnable tensors and ``table`` holds one report row per completed step.
The fingerprint ties the directory to one config, model and calibration set.

Why a hash: a resumed run trusts the file completely (it skips the windows it says are done), so
a flipped byte would silently end in different weights.  Every byte of the file is covered: the
magic and the digest by their exact expected form, the payload by the digest.  Anything that does
not check out raises ``WorkDirError`` (a ``ValueError``) saying what is wrong and what to do.
"""

from __future__ import annotations

import hashlib
import io
import os

import torch

STATE_FILE = "state.pt"
MAGIC = b"sliderquant-state 2\n"
_DIGEST_LEN = 64
_KEYS = ("fingerprint", "done", "total", "learned", "table")


class WorkDirError(ValueError):
    """A work directory that cannot be resumed (corrupt, foreign or inconsistent state)."""


def fingerprint(config_hash: str, *tensors: torch.Tensor, extra: str = "") -> str:
    h = hashlib.sha256(config_hash.encode() + extra.encode())
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:24]


def encode_state(state: dict) -> bytes:
    """The file bytes of ``state``: magic line, sha256 of the payload, payload."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    return MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload


def decode_state(blob: bytes, where: str = STATE_FILE) -> dict:
    """The state in ``blob`` after checking its magic line and hash; ``WorkDirError`` otherwise."""
    fix = "delete it to start the run over"
    if not blob.startswith(MAGIC):
        raise WorkDirError(f"{where} is not a sliderquant work state of this version (format 2); {fix}")
    head = len(MAGIC)
    digest = blob[head:head + _DIGEST_LEN]
    payload = blob[head + _DIGEST_LEN + 1:]
    if blob[head + _DIGEST_LEN:head + _DIGEST_LEN + 1] != b"\n" or \
            hashlib.sha256(payload).hexdigest().encode() != digest:
        raise WorkDirError(f"{where} fails its integrity check (sha256 of the contents differs from the "
                           f"recorded one): the file is corrupt or truncated; {fix}")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a payload that hashes right but does not load: same user error
        raise WorkDirError(f"{where} passed its integrity check but cannot be read ({e}); {fix}") from None
    if not isinstance(state, dict):
        raise WorkDirError(f"{where} does not hold a state mapping; {fix}")
    missing = [k for k in _KEYS if k not in state]
    if missing:
        raise WorkDirError(f"{where} lacks {', '.join(missing)}; it was not written by this version "
                           f"of sliderquant; {fix}")
    return state


def read_state(path: str) -> dict:
    """The verified contents of a state file (for tools and tests; the engine uses ``WorkDir``)."""
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise WorkDirError(f"{path} cannot be read ({e})") from None
    return decode_state(blob, path)


class WorkDir:
    def __init__(self, path: str, fingerprint: str):
        self.path = path
        self.fingerprint = fingerprint
        os.makedirs(path, exist_ok=True)

    @property
    def state_path(self) -> str:
        return os.path.join(self.path, STATE_FILE)

    def load(self, total: int | None = None, like: dict | None = None) -> dict | None:
        """The saved state, or None for a fresh directory.

        Refuses (``WorkDirError``) a corrupt or truncated file, a state of another run, a ``done``
        outside ``[0, total]`` (``total``: the number of (stage, window) steps of this run), a
        report table that does not have one row per completed step, and, given ``like`` (the
        current learned tensors, ``{linear: {name: tensor}}``), learned tensors whose names,
        shapes or dtypes differ from it.
        """
        if not os.path.exists(self.state_path):
            return None
        state = read_state(self.state_path)
        where, fix = f"work directory {self.path}", "delete it (or use another --work-dir) to start over"
        if state["fingerprint"] != self.fingerprint:
            raise WorkDirError(
                f"{where} belongs to a different run (config, model or calibration data differ: "
                f"fingerprint {state['fingerprint']} != {self.fingerprint}); use another --work-dir or "
                f"delete this one")
        done, saved_total = state["done"], state["total"]
        if saved_total is not None and (isinstance(saved_total, bool) or not isinstance(saved_total, int)):
            raise WorkDirError(f"{where}: the recorded window count {saved_total!r} is not an integer; {fix}")
        limit = total if total is not None else saved_total
        if isinstance(done, bool) or not isinstance(done, int) or done < 0 or \
                (limit is not None and done > limit):
            raise WorkDirError(f"{where}: {done!r} completed windows is outside [0, {limit}]; {fix}")
        if total is not None and saved_total is not None and saved_total != total:
            raise WorkDirError(f"{where} was written for {saved_total} windows, this run has {total}; {fix}")
        if not isinstance(state["table"], list) or len(state["table"]) != done:
            raise WorkDirError(f"{where}: the report table does not have one row per completed window "
                               f"({done}); {fix}")
        _check_learned(state["learned"], like, where, fix)
        return state

    def save(self, done: int, learned: dict, table: list, total: int | None = None) -> None:
        blob = encode_state({"fingerprint": self.fingerprint, "done": done, "total": total,
                             "learned": learned, "table": table})
        tmp = self.state_path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())     # the rename must not land before the bytes do
        os.replace(tmp, self.state_path)


def _check_learned(learned, like: dict | None, where: str, fix: str) -> None:
    if not isinstance(learned, dict) or not all(
            isinstance(v, dict) and all(isinstance(t, torch.Tensor) for t in v.values())
            for v in learned.values()):
        raise WorkDirError(f"{where}: the learned state is not a mapping of linears to tensors; {fix}")
    if like is None:
        return
    if set(learned) != set(like):
        extra, missing = sorted(set(learned) - set(like)), sorted(set(like) - set(learned))
        raise WorkDirError(f"{where}: the learned state does not match this model's quantized linears "
                           f"(unexpected: {extra[:3]}, missing: {missing[:3]}); {fix}")
    for name, tensors in like.items():
        saved = learned[name]
        if set(saved) != set(tensors):
            raise WorkDirError(f"{where}: {name} has learned tensors {sorted(saved)}, this run expects "
                               f"{sorted(tensors)}; {fix}")
        for key, t in tensors.items():
            s = saved[key]
            if s.shape != t.shape or s.dtype != t.dtype:
                raise WorkDirError(f"{where}: {name}.{key} is {s.dtype} {tuple(s.shape)}, this run expects "
                                   f"{t.dtype} {tuple(t.shape)}; {fix}")
