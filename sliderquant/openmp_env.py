"""The OpenMP wait policy sliderquant runs under: waiting threads sleep (``OMP_WAIT_POLICY=PASSIVE``).

OpenMP threads that run out of work spin on their CPU for a while before sleeping (libgomp's
default; torch and sliderquant's kernels share that runtime).  On a machine whose cores are also busy
with other jobs, the spinning threads take CPU time from the ones that have work, and every parallel
region waits for its slowest, possibly descheduled, thread: a loop of small parallel calls then runs
several times slower (``python -m sliderquant.bench threads`` measures it: on this project's shared
2-core machine a loop of 200 fake-quantization calls took 19 s with the default policy and 3.3 s with
PASSIVE, 54 s and 12 s with four more busy processes).  With PASSIVE, idle threads sleep at once; on a
quiet machine that costs a wake-up per parallel region (microseconds).

The policy is read once, when the OpenMP runtime starts, i.e. when torch is first imported, so this
module runs first in ``sliderquant/__init__.py``.  It only sets a default: an ``OMP_WAIT_POLICY``
already in the environment is kept, and nothing changes when torch was imported before sliderquant
(the runtime has started; setting the variable then would only mislead).  Imports nothing of ours.
"""

from __future__ import annotations

import os
import sys

DEFAULT_WAIT_POLICY = "PASSIVE"


def set_default_wait_policy(environ=os.environ, modules=sys.modules) -> bool:
    """Sets ``OMP_WAIT_POLICY`` to PASSIVE unless it is set or torch is already imported; True if it did."""
    if "OMP_WAIT_POLICY" in environ or "torch" in modules:
        return False
    environ["OMP_WAIT_POLICY"] = DEFAULT_WAIT_POLICY
    return True


set_default_wait_policy()
