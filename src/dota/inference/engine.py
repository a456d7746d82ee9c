"""The inference engine: decides what to compute for a request; the model computes.

This first version batches requests and runs the plain full forward pass in inference mode.
"""

from __future__ import annotations

from typing import Any

import time

import numpy as np
import torch

from dota.model import DoTA, scaled_inputs


class InferenceEngine:
    """Runs a :class:`~dota.model.DoTA` model on HU/MeV input and returns Gy per 1e9 primaries."""

    def __init__(self, model: DoTA) -> None:
        self.model = model
        self.enabled = True

    def reset(self) -> None:
        """Drop every cached result (nothing is cached in this version)."""

    @torch.inference_mode()
    def predict(self, geometry_hu: Any, energies_mev: Any, batch_size: int = 16) -> np.ndarray:
        model = self.model
        if model.training:
            raise RuntimeError("predict() runs inference only: call model.eval() first")
        g, e = scaled_inputs(model, geometry_hu, energies_mev)
        out = torch.empty_like(g)
        for s in range(0, g.shape[0], batch_size):
            out[s : s + batch_size] = model(g[s : s + batch_size], e[s : s + batch_size])
        return model.normalization.unscale_dose(out).clamp_min_(0).cpu().numpy()

    def compare_with_full_pass(self, geometry_hu: Any, energies_mev: Any) -> dict[str, float]:
        """Run this engine and the plain full pass on the same beamlets: the largest difference relative
        to the plain pass's maximum dose, and the milliseconds per beamlet of each (used by training
        to validate the cached path every epoch)."""
        enabled = self.enabled
        n = max(1, int(np.asarray(energies_mev).size))
        try:
            self.enabled = False
            t0 = time.perf_counter()
            plain = self.predict(geometry_hu, energies_mev)
            t1 = time.perf_counter()
            self.enabled = True
            self.reset()
            fast = self.predict(geometry_hu, energies_mev)
            t2 = time.perf_counter()
        finally:
            self.enabled = enabled
        scale = max(float(plain.max()), 1e-30)
        return {
            "max_abs_diff_rel": float(np.abs(fast - plain).max()) / scale,
            "baseline_ms": (t1 - t0) * 1e3 / n,
            "engine_ms": (t2 - t1) * 1e3 / n,
        }
