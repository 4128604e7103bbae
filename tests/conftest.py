"""Shared test fixtures.

Tests run on the CPU in float32 by default; gradient checks switch to float64
locally with ``jax.experimental.enable_x64`` (see ``x64`` below).
"""
import contextlib

import jax
import numpy as np
import pytest


def _has_gpu():
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@contextlib.contextmanager
def _x64():
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", prev)


@pytest.fixture
def x64():
    """Run the test body with float64 enabled."""
    with _x64():
        yield


@pytest.fixture
def rng():
    return np.random.default_rng(0)
