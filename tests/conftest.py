"""Shared fixtures: small synthetic datasets and seeded models (fast on 2 CPU cores)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dota.data.hdf5 import write_dataset

TEST_ATTRS = {"engine": "synthetic", "engine_version": "test", "primaries": 0, "hu_calibration": "none"}


def synthetic_beamlets(n: int, seed: int = 0, shape=(150, 24, 24)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random slab geometries with a Bragg-like dose whose range follows the energy: cheap and
    learnable, for format and training tests (physics tests use the analytic engine)."""
    rng = np.random.default_rng(seed)
    l, h, w = shape
    geometry = np.zeros((n, l, h, w), np.int16)
    energy = rng.uniform(70, 220, n).astype(np.float32)
    z = np.arange(l)[:, None, None] * 2.0
    yy, xx = np.meshgrid(np.arange(h) - (h - 1) / 2, np.arange(w) - (w - 1) / 2, indexing="ij")
    dose = np.zeros((n, l, h, w), np.float32)
    for i in range(n):
        a, b = sorted(rng.integers(0, l, 2))
        geometry[i, a:b] = rng.choice([-700, 0, 800])
        r = 0.0022 * energy[i] ** 1.77 * 10  # mm, roughly the proton range in water
        depth = np.exp(-0.5 * ((z - r) / 4.0) ** 2) + 0.3 * (z < r)
        dose[i] = depth * np.exp(-(yy**2 + xx**2) / 8.0)[None]
    return geometry, energy, dose


@pytest.fixture(scope="session")
def small_h5(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "small.h5"
    g, e, d = synthetic_beamlets(24, seed=1)
    write_dataset(path, g, d, e, attrs=TEST_ATTRS, meta={"seed": np.arange(24)})
    return path


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield
