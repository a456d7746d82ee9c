"""Models that learn a correction to the analytic pencil beam (``base_engine="analytic"``), from the CT
alone (``-res`` presets) or with the analytic dose as an input channel too (``-pb``, ``base_input``).

The engine adds the same base dose to its output and to the plain pass's, so the exactness bound of
every other path holds for the total dose; an untrained model (zero output layer) is the analytic engine.
"""

import numpy as np
import pytest
import torch

from dota.engines import get_engine
from dota.inference import InferenceEngine
from dota.inference.engine import geometry_digests
from dota.model import PRESETS, DoTA, Normalization, init_weights

from .helpers import TOL, phantoms

PRESETS_WITH_BASE = ["tiny-res", "tiny-pb"]


def full_pass(model: DoTA, geometry_hu: np.ndarray, energies_mev: np.ndarray) -> torch.Tensor:
    """The plain forward pass of the network on its own inputs (scaled CT, and the base dose for -pb)."""
    norm = model.normalization
    with torch.inference_mode():
        g = norm.scale_geometry(torch.from_numpy(np.asarray(geometry_hu, np.float32)))
        e = norm.scale_energy(torch.from_numpy(np.asarray(energies_mev, np.float32)))
        x = model.network_input(g, model.base_dose_scaled(geometry_hu, energies_mev))
        return torch.cat([model(x[i : i + 2], e[i : i + 2]) for i in range(0, len(g), 2)])


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


@pytest.mark.parametrize("preset", PRESETS_WITH_BASE)
def test_untrained_model_is_the_analytic_engine(preset):
    g, e = _request()
    model = _model(preset, perturb=False)
    analytic = get_engine("analytic").dose(g, e)
    np.testing.assert_allclose(InferenceEngine(model).predict(g, e), analytic, rtol=0, atol=1e-6 * analytic.max())


@pytest.mark.parametrize("preset", PRESETS_WITH_BASE)
@pytest.mark.parametrize("mode", [{}, {"prefix_cache_bytes": 0}, {"truncation": "none"}, {"share_geometry": False},
                                  {"truncation": "stream"}])
def test_total_dose_equals_plain_pass_plus_base(mode, preset):
    g, e = _request()
    model = _model(preset, perturb=True)
    base = model.base_dose_scaled(g, e)
    ref = (full_pass(model, g, e) + base).clamp_min(0) * model.normalization.dose_max
    engine = InferenceEngine(model, path="engine", **mode)
    for _ in range(2):  # cold and warm caches
        out = torch.from_numpy(engine.predict(g, e))
        for i in range(len(e)):
            k = int(engine.last_stats["computed"][i])
            scale = float(ref[i].max())
            assert float((out[i, :k] - ref[i, :k]).abs().max()) <= TOL * scale
            # beyond the computed slices the engine returns the base dose only (the analytic dose is zero there)
            if k < out.shape[1]:
                assert float(out[i, k:].abs().max()) <= TOL * scale


def test_energy_input_model_shares_no_work_between_energies():
    """With the base dose as input the encoder depends on the energy: one geometry at two energies must
    not share the encoder (the engine would return the first energy's dose for both)."""
    g, e = _request()
    model = _model("tiny-pb", perturb=True)
    engine = InferenceEngine(model, path="engine", prefix_cache_bytes=0)
    groups, _ = engine._groups(geometry_digests(g), torch.from_numpy(e))
    assert all(len(grp) == 1 for grp in groups)
    same = np.repeat(g[:1], 2, 0)
    groups, _ = engine._groups(geometry_digests(same), torch.tensor([0.5, 0.5]))
    assert groups == [[0, 1]]  # identical beamlets still share


def test_tail_check_uses_the_total_dose():
    """A correction of 1e-4 of the total maximum in the margin is not a reason to recompute in full."""
    g, e = _request()
    model = _model("tiny-res", perturb=True)
    engine = InferenceEngine(model)
    net, computed = engine.predict_scaled(g, e)
    base = model.base_dose_scaled(g, e)
    redo = engine._unverified(net, computed, base)
    alone = engine._unverified(net, computed)
    assert len(redo) <= len(alone)


def _support_model(preset: str) -> DoTA:
    """A perturbed base model with a range support (the dose is zero 10 mm past the base dose's 1e-3 extent)."""
    from dataclasses import replace

    cfg = replace(PRESETS[preset], support_fraction=1e-3, support_margin_mm=10.0)
    model = init_weights(DoTA(cfg, Normalization(dose_max=0.05)), seed=3)
    with torch.no_grad():  # a correction that is nonzero on every slice, also beyond the beam's range
        model.decoder.out.weight.normal_(0.0, 1e-3, generator=torch.Generator().manual_seed(1))
        model.decoder.out.bias.fill_(1e-3)
    return model.eval()


def test_support_slices_follow_the_base_dose():
    g, e = _request()
    model = _support_model("tiny-pb")
    base = model.base_dose_scaled(g, e)
    support = model.support_slices(base)
    per_slice = base.flatten(2).amax(2)
    for i in range(len(e)):
        last = int(torch.nonzero(per_slice[i] > 1e-3 * per_slice[i].max()).max())
        assert support[i] == min(base.shape[1], last + 1 + 5)  # 10 mm margin = 5 slices of 2 mm
    assert support.min() < base.shape[1]  # the phantoms' beams stop inside the block
    no_support = _model("tiny-pb", perturb=True)
    assert no_support.support_slices(base) is None


@pytest.mark.parametrize("preset", ["tiny-pb", "tiny-res"])
@pytest.mark.parametrize("mode", [{}, {"prefix_cache_bytes": 0}, {"truncation": "none"}, {"truncation": "stream"},
                                  {"share_geometry": False}])
def test_support_model_every_path_equals_its_plain_pass(preset, mode):
    """With a range support the plain pass is zero from each beamlet's support on, and every path (the
    batched prefix passes the support allows included) equals it there and before it."""
    g, e = _request()
    model = _support_model(preset)
    plain = InferenceEngine(model, path="plain").predict(g, e)
    base = model.base_dose_scaled(g, e)
    support = model.support_slices(base)
    assert np.sum(support < plain.shape[1]) >= 3  # most of these beams stop inside the block
    for i in range(len(e)):
        assert not plain[i, support[i]:].any() and plain[i, support[i] - 1].max() > 0
    engine = InferenceEngine(model, path="engine", **mode)
    for _ in range(2):
        out = engine.predict(g, e)
        for i in range(len(e)):
            assert float(np.abs(out[i] - plain[i]).max()) <= TOL * float(plain[i].max())
    check = InferenceEngine(model, **mode).compare_with_full_pass(g, e)
    assert check["max_abs_diff_rel"] <= TOL and check["tail_rel"] == 0.0


def test_support_model_computes_only_its_support():
    g, e = _request()
    model = _support_model("tiny-pb")
    support = model.support_slices(model.base_dose_scaled(g, e))
    engine = InferenceEngine(model, path="engine")
    engine.predict(g, e)
    assert engine.last_stats["recomputed"] == 0
    np.testing.assert_array_equal(engine.last_stats["computed"], support)


def test_support_needs_a_base_engine_and_sane_values():
    from dataclasses import replace

    from dota.errors import InputError

    with pytest.raises(InputError, match="base_engine"):
        replace(PRESETS["tiny"], support_fraction=1e-3)
    with pytest.raises(InputError, match="support_fraction"):
        replace(PRESETS["tiny-pb"], support_fraction=1.5)
    with pytest.raises(InputError, match="support_margin_mm"):
        replace(PRESETS["tiny-pb"], support_margin_mm=-1.0)


def test_support_model_auto_path_is_the_engine():
    g, e = _request()
    engine = InferenceEngine(_support_model("tiny-pb"))
    for _ in range(3):
        engine.predict(g, e)
        assert engine.last_stats["path"] == "engine"
    assert engine.chooser.times == {}
