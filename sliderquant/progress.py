"""Progress of a long loop (windows, GPTQ layers): a bar on a terminal, log lines elsewhere.

A calibration runs for 20-30 minutes.  On a terminal a tqdm bar shows it; when the output goes to
a file or a CI log a bar would be either garbage or (tqdm's ``disable=None``) nothing at all, so
each step then logs one line instead: what finished, its loss, the time so far and an estimate of
the time left.  The estimate uses only the steps run in this process (a resumed run did not spend
time on the steps it skipped).
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)


def _interactive() -> bool:
    """Whether progress goes to a terminal (tqdm writes to stderr)."""
    stream = sys.stderr
    return stream is not None and hasattr(stream, "isatty") and stream.isatty()


def format_seconds(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``: short durations for log lines."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class Progress:
    """``total`` steps of ``unit``, ``initial`` of them already done (a resumed run)."""

    def __init__(self, total: int, desc: str, unit: str = "step", initial: int = 0):
        self.total, self.desc, self.unit = total, desc, unit
        self.done = self.initial = initial
        self.start = time.monotonic()
        self.bar = None
        if _interactive():
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit)

    def update(self, **fields) -> None:
        """One more step done; ``fields`` (stage, window, loss, ...) describe it."""
        self.done += 1
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in fields.items()}
        if self.bar is not None:
            self.bar.set_postfix(**shown)
            self.bar.update(1)
            return
        elapsed = time.monotonic() - self.start
        ran = self.done - self.initial
        eta = elapsed / ran * (self.total - self.done)
        described = ", ".join(f"{k} {v}" for k, v in shown.items())
        log.info("%s: %s %d/%d done (%s), elapsed %s, ETA %s", self.desc, self.unit, self.done, self.total,
                 described, format_seconds(elapsed), format_seconds(eta))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
