"""Shared test helpers: offline assets are required under CI (CI=true), optional elsewhere;
one torch thread for tiny models; a fast quantization config."""

from __future__ import annotations

import os

import pytest
import torch

from sliderquant.assets import asset_path
from sliderquant.config import QuantConfig


def required(find, what: str):
    """``find()``; when it raises FileNotFoundError: fails under CI (``what``: exc), skips elsewhere."""
    try:
        return find()
    except FileNotFoundError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{what}: {exc}", pytrace=False)
        pytest.skip(str(exc))


def require_asset(name: str):
    """Path of the offline asset ``name``; fails under CI, skips elsewhere, when it is missing."""
    return required(lambda: asset_path(name), "required offline asset missing under CI")


def require_smollm2_gguf():
    """Path of the SmolLM2-135M GGUF file; fails under CI, skips elsewhere, when it is missing."""
    from sliderquant import data
    return required(data.smollm2_gguf_path, "required under CI")


@pytest.fixture
def one_thread():
    """One torch thread for the test: on tiny matrices one thread is much faster than two fighting
    over a busy machine.  Use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fast_config(method="sliderquant", epochs=2, **kw):
    """A QuantConfig small enough for the tiny test models (W2, 6 samples of 16 tokens)."""
    return QuantConfig(**{**dict(method=method, wbits=2, epochs=epochs, batch_size=2, nsamples=6, seqlen=16),
                          **kw})


@pytest.fixture
def asset():
    """Fixture form of ``require_asset``: ``asset("wikitext2_test.txt")``."""
    return require_asset
