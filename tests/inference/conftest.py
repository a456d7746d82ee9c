"""Fixtures for the inference tests: seeded models and the trained checkpoint when present."""

from __future__ import annotations

import pytest

from dota.checkpoint import load_model
from dota.model import DoTA

from .helpers import TRAINED


@pytest.fixture(scope="session")
def paper() -> DoTA:
    return load_model("paper", seed=1)


@pytest.fixture(scope="session")
def tiny() -> DoTA:
    """Two blocks, num_forward = 2: the look-ahead case."""
    return load_model("tiny", seed=2)


@pytest.fixture(scope="session")
def trained() -> DoTA:
    """The small preset trained on analytic data (provided by the project at tests/data)."""
    if not TRAINED.is_file():
        pytest.skip(f"trained checkpoint tests/data/{TRAINED.name} not present")
    return load_model(TRAINED)
