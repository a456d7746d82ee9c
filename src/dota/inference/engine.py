"""The inference engine: decides what to compute for a request; the model computes.

This first version batches requests and runs the plain full forward pass in inference mode.
"""

from __future__ import annotations

from typing import Any

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
