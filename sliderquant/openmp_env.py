"""How long idle OpenMP threads spin before they sleep: sliderquant sets ``GOMP_SPINCOUNT=10000``.

OpenMP threads that run out of work spin on their CPU before sleeping (libgomp's default is about
300,000 spins; torch and sliderquant's kernels share that runtime).  On a machine whose cores are
also busy with other jobs, the spinning threads take CPU time from the ones that have work, and
every parallel region waits for its slowest, possibly descheduled, thread: a loop of small parallel
calls then runs several times slower.  ``OMP_WAIT_POLICY=PASSIVE`` (sleep at once) cures that but
pays a wake-up in every parallel region on a quiet machine.  A short spin keeps both:
``python -m sliderquant.bench threads`` (200 fake-quantization forward+backward calls, 1536x576 W3
g64, 2 threads, medians of 3 interleaved rounds) measured on this project's shared 2-core machine,
other jobs running (load ~7): libgomp's default 6.96 s, PASSIVE 1.42 s, ``GOMP_SPINCOUNT=10000``
1.40 s; with four more busy processes 14.0 s, 5.66 s and 2.79 s; torch matmul loops 2.88 / 1.54 /
1.42 s and 12.6 / 11.1 / 10.6 s.  At load ~3, default 0.67 s against PASSIVE 0.95 s: PASSIVE alone
would cost speed on a quiet machine.

The setting is read once, when the OpenMP runtime starts, i.e. when torch is first imported, so this
module runs first in ``sliderquant/__init__.py``.  It only sets a default: nothing is changed when
the user set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``, or when torch was imported before sliderquant
(the runtime has started; setting the variable then would only mislead).  Imports nothing of ours.
"""

from __future__ import annotations

import os
import sys

DEFAULT_SPINCOUNT = "10000"


def set_default_wait_policy(environ=os.environ, modules=sys.modules) -> bool:
    """Sets ``GOMP_SPINCOUNT=10000`` unless a wait setting is chosen or torch is imported; True if it did."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ or "torch" in modules:
        return False
    environ["GOMP_SPINCOUNT"] = DEFAULT_SPINCOUNT
    return True


set_default_wait_policy()
