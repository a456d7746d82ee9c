"""Helpers shared by the inference tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dota.model import DoTA

TRAINED = Path(__file__).resolve().parents[1] / "data" / "small_trained.safetensors"
TOL = 1e-5  # fp32: max |engine - plain pass| over computed slices, relative to the beamlet's max |dose|


def phantoms(kinds: list[str], seed: int = 0) -> np.ndarray:
    from dota.physics import make_phantom

    rng = np.random.default_rng(seed)
    return np.stack([make_phantom(k, rng) for k in kinds]).astype(np.float32)


def full_pass(model: DoTA, geometry_hu: np.ndarray, energies_mev: np.ndarray) -> torch.Tensor:
    """The plain forward pass on scaled inputs: the reference of every test here."""
    norm = model.normalization
    with torch.inference_mode():
        g = norm.scale_geometry(torch.from_numpy(np.asarray(geometry_hu, np.float32)))
        e = norm.scale_energy(torch.from_numpy(np.asarray(energies_mev, np.float32)))
        return torch.cat([model(g[i : i + 4], e[i : i + 4]) for i in range(0, len(g), 4)])


def max_rel_diff(out: torch.Tensor, ref: torch.Tensor, computed) -> float:
    """Largest |out - ref| over each beamlet's computed slices, relative to its max |ref|."""
    worst = 0.0
    for i, k in enumerate(np.asarray(computed).tolist()):
        worst = max(worst, float((out[i, :k] - ref[i, :k]).abs().max() / ref[i].abs().max()))
    return worst
