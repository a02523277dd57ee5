"""The kernel tests' rule for a missing ``sliderquant._C``: fail, unless the build is meant to be without it.

``sliderquant`` works without its extension (the pure-torch path), so ``import sliderquant.ops``
succeeds either way.  A test suite that merely skipped the kernel tests would then pass without
ever testing the C kernels.  Tests that need the extension call :func:`require_c`: it fails the
test when ``_C`` did not import, and skips it only when ``SLIDERQUANT_ALLOW_NO_EXTENSION=1`` says
that this build is deliberately without the extension.  Tests of the pure-torch path run either way.
"""

from __future__ import annotations

import os

import pytest

from sliderquant import ops

ALLOW_VAR = "SLIDERQUANT_ALLOW_NO_EXTENSION"


def require_c():
    """``sliderquant._C``; fails the calling test when it is missing, unless ``ALLOW_VAR=1`` (then skips)."""
    if ops._C is not None:
        return ops._C
    msg = (f"sliderquant._C did not import ({ops._C_ERROR}); build it with `pip install -e .` or "
           f"`python setup.py build_ext --inplace`, or set {ALLOW_VAR}=1 if this build is meant to run "
           "without the C extension")
    if os.environ.get(ALLOW_VAR) == "1":
        pytest.skip(msg)
    pytest.fail(msg, pytrace=False)
