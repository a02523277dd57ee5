"""Resumable work directory: the learned state after each completed window.

One file, ``state.pt``, rewritten atomically (temporary file + ``os.replace``) after every window:
``{"fingerprint", "done", "learned", "table"}`` where ``done`` counts the completed
(stage, window) steps, ``learned`` maps each quantized linear to its learnable tensors and
``table`` holds the per-window report rows.  The fingerprint ties the directory to one config,
model and calibration set; anything else is refused.
"""

from __future__ import annotations

import hashlib
import os

import torch

STATE_FILE = "state.pt"


def fingerprint(config_hash: str, *tensors: torch.Tensor, extra: str = "") -> str:
    h = hashlib.sha256(config_hash.encode() + extra.encode())
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:24]


class WorkDir:
    def __init__(self, path: str, fingerprint: str):
        self.path = path
        self.fingerprint = fingerprint
        os.makedirs(path, exist_ok=True)

    @property
    def state_path(self) -> str:
        return os.path.join(self.path, STATE_FILE)

    def load(self) -> dict | None:
        """The saved state, or None for a fresh directory; refuses a foreign or corrupt one."""
        if not os.path.exists(self.state_path):
            return None
        try:
            state = torch.load(self.state_path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
            raise RuntimeError(f"work directory {self.path}: {STATE_FILE} is unreadable ({e}); "
                               f"delete it to start over") from None
        if not isinstance(state, dict) or "fingerprint" not in state:
            raise RuntimeError(f"work directory {self.path}: {STATE_FILE} is not a sliderquant state; "
                               f"delete it to start over")
        if state["fingerprint"] != self.fingerprint:
            raise RuntimeError(
                f"work directory {self.path} belongs to a different run (config, model or calibration "
                f"data differ: fingerprint {state['fingerprint']} != {self.fingerprint}); use another "
                f"--work-dir or delete this one")
        return state

    def save(self, done: int, learned: dict, table: list) -> None:
        tmp = self.state_path + ".tmp"
        torch.save({"fingerprint": self.fingerprint, "done": done, "learned": learned,
                    "table": table}, tmp)
        os.replace(tmp, self.state_path)
