"""Shared test helpers: offline assets are required under CI (CI=true), optional elsewhere."""

from __future__ import annotations

import os

import pytest

from sliderquant.assets import asset_path


def require_asset(name: str):
    """Path of the offline asset ``name``; fails under CI, skips elsewhere, when it is missing."""
    try:
        return asset_path(name)
    except FileNotFoundError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"required offline asset missing under CI: {exc}", pytrace=False)
        pytest.skip(str(exc))


@pytest.fixture
def asset():
    """Fixture form of ``require_asset``: ``asset("wikitext2_test.txt")``."""
    return require_asset
