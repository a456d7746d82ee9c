"""Models that learn a correction to the analytic pencil beam (``base_engine="analytic"``).

The engine adds the same base dose to its output and to the plain pass's, so the exactness bound of
every other path holds for the total dose; an untrained model (zero output layer) is the analytic engine.
"""

import numpy as np
import pytest
import torch

from dota.engines import get_engine
from dota.inference import InferenceEngine
from dota.model import PRESETS, DoTA, Normalization, init_weights

from .helpers import TOL, full_pass, phantoms


def _model(preset: str, perturb: bool) -> DoTA:
    model = init_weights(DoTA(PRESETS[preset], Normalization(dose_max=0.05)), seed=3)
    if perturb:  # a model that has learned something: a nonzero correction everywhere it computes
        with torch.no_grad():
            model.decoder.out.weight.normal_(0.0, 1e-3, generator=torch.Generator().manual_seed(1))
    return model.eval()


def _request() -> tuple[np.ndarray, np.ndarray]:
    geos = phantoms(["heterogeneous", "lung", "bone"], 4)
    g = np.concatenate([np.repeat(geos[:1], 3, 0), geos[1:]])
    return g, np.array([80.0, 140.0, 200.0, 120.0, 170.0], np.float32)


def test_untrained_model_is_the_analytic_engine():
    g, e = _request()
    model = _model("tiny-pb", perturb=False)
    analytic = get_engine("analytic").dose(g, e)
    np.testing.assert_allclose(model.predict(g, e), analytic, rtol=0, atol=1e-6 * analytic.max())


@pytest.mark.parametrize("mode", [{}, {"prefix_cache_bytes": 0}, {"truncation": "none"}, {"share_geometry": False}])
def test_total_dose_equals_plain_pass_plus_base(mode):
    g, e = _request()
    model = _model("tiny-pb", perturb=True)
    base = model.base_dose_scaled(g, e)
    ref = (full_pass(model, g, e) + base).clamp_min(0) * model.normalization.dose_max
    engine = InferenceEngine(model, **mode)
    for _ in range(2):  # cold and warm caches
        out = torch.from_numpy(engine.predict(g, e))
        for i in range(len(e)):
            k = int(engine.last_stats["computed"][i])
            scale = float(ref[i].max())
            assert float((out[i, :k] - ref[i, :k]).abs().max()) <= TOL * scale
            # beyond the computed slices the engine returns the base dose only (the analytic dose is zero there)
            if k < out.shape[1]:
                assert float(out[i, k:].abs().max()) <= TOL * scale


def test_tail_check_uses_the_total_dose():
    """A correction of 1e-4 of the total maximum in the margin is not a reason to recompute in full."""
    g, e = _request()
    model = _model("tiny-pb", perturb=True)
    engine = InferenceEngine(model)
    net, computed = engine.predict_scaled(g, e)
    base = model.base_dose_scaled(g, e)
    redo = engine._unverified(net, computed, base)
    alone = engine._unverified(net, computed)
    assert len(redo) <= len(alone)
