"""Range truncation against physics: the margin never cuts dose above the output cutoff.

The engine computes slices [0, s) with s from :func:`dota.physics.stopping_depth_index` at
``TRUNCATION_MARGIN_MM``. At or beyond s, no dose above ``OUTPUT_CUTOFF_FRACTION`` of the maximum may
be found in: the analytic engine on extreme geometries (bone, lung, air gaps, all air), Monte Carlo
(the golden MCsquare beamlets), and a model trained on analytic data.
"""

from pathlib import Path

import numpy as np
import pytest

from dota.constants import HU_AIR, OUTPUT_CUTOFF_FRACTION, PAPER_REL_ERROR_DOTA, TRUNCATION_MARGIN_MM
from dota.inference import InferenceEngine

from .helpers import TRAINED, full_pass, phantoms

GOLDEN_MC = Path(__file__).resolve().parents[1] / "data" / "golden_mc.h5"

ENERGIES = [70.0, 110.0, 160.0, 220.0]


def extreme_geometries() -> np.ndarray:
    shape = (150, 24, 24)
    water = np.zeros(shape, np.float32)
    air_gap = water.copy()
    air_gap[:30] = HU_AIR  # 6 cm of air before the patient
    bone = np.full(shape, 1500.0, np.float32)
    lung = np.full(shape, -750.0, np.float32)
    layers = water.copy()
    for z in range(0, 150, 20):
        layers[z : z + 10] = 1200.0 if (z // 20) % 2 else -1000.0  # bone and air cavities alternating
    half = water.copy()
    half[:, :, :12] = -800.0  # a lateral lung/water interface along the beam
    air = np.full(shape, HU_AIR, np.float32)
    made = phantoms(["bone", "lung", "heterogeneous", "heterogeneous", "slab"], seed=11)
    return np.concatenate([np.stack([water, air_gap, bone, lung, layers, half, air]), made])


def grid():
    g = extreme_geometries()
    return np.repeat(g, len(ENERGIES), 0), np.tile(np.array(ENERGIES, np.float32), len(g))


def test_analytic_dose_beyond_the_cut_is_below_the_cutoff(tiny):
    from dota.engines import get_engine

    g, e = grid()
    cut = InferenceEngine(tiny).required_slices(g, e)
    dose = get_engine("analytic").dose(g, e)
    slack_mm = []
    for i, s in enumerate(cut):
        peak = dose[i].max()
        assert peak > 0
        above = np.flatnonzero(dose[i].reshape(150, -1).max(1) > OUTPUT_CUTOFF_FRACTION * peak)
        assert above.max() < s, (i, e[i], s, above.max())
        slack_mm.append((s - 1 - above.max()) * 2.0)
    assert min(slack_mm) >= 0
    # dense or bony blocks stop every energy inside the block; all-air blocks never stop a beam
    assert cut[2 * len(ENERGIES) : 3 * len(ENERGIES)].max() < 150
    assert (cut[6 * len(ENERGIES) : 7 * len(ENERGIES)] == 150).all()


def test_margin_is_applied_in_water_equivalent_depth(tiny):
    g = extreme_geometries()[:1]
    e = np.array([150.0], np.float32)
    s0 = InferenceEngine(tiny, margin_mm=0.0).required_slices(g, e)[0]
    s1 = InferenceEngine(tiny, margin_mm=TRUNCATION_MARGIN_MM).required_slices(g, e)[0]
    s2 = InferenceEngine(tiny, margin_mm=TRUNCATION_MARGIN_MM + 20.0).required_slices(g, e)[0]
    assert s0 <= s1 < s2 and s2 - s1 == 10  # 20 mm of water = 10 slices of 2 mm


def test_monte_carlo_dose_beyond_the_cut_is_below_the_cutoff(tiny):
    """MCsquare (1e6 primaries) leaves 4e-4 to 7e-4 of the maximum beyond the cut: secondaries and noise."""
    from dota.data.hdf5 import read_dataset

    if not GOLDEN_MC.is_file():
        pytest.skip("tests/data/golden_mc.h5 not present")
    data = read_dataset(GOLDEN_MC)
    cut = InferenceEngine(tiny).required_slices(data.geometry.astype(np.float32), data.energy)
    assert (cut < 150).sum() >= 3
    for i, s in enumerate(cut):
        profile = data.dose[i].reshape(data.dose.shape[1], -1).max(axis=1)
        assert profile[s:].max(initial=0.0) <= OUTPUT_CUTOFF_FRACTION * profile.max(), (i, s)


def test_truncated_engine_never_loses_dose_the_full_pass_gives(trained, tiny):
    """With the tail check (the default), the engine's output over the WHOLE block equals the full pass
    within the output cutoff, whatever the model learned: an under-trained model that still puts dose
    beyond the physical range gets those beamlets recomputed in full; random weights get every beamlet
    recomputed."""
    g, e = grid()
    for model in (trained, tiny):
        ref = full_pass(model, g, e)
        engine = InferenceEngine(model)
        out, computed = engine.predict_scaled(g, e)
        scale = ref.abs().amax(dim=(1, 2, 3)).clamp_min(1e-30)
        diff = ((out - ref).abs().amax(dim=(1, 2, 3)) / scale).max().item()
        assert diff <= OUTPUT_CUTOFF_FRACTION, (model.config.enc_channels, diff)
        kept = computed < 150
        for i in np.flatnonzero(kept):
            tail = float(ref[i, computed[i]:].abs().max() / scale[i])
            assert tail <= OUTPUT_CUTOFF_FRACTION, (i, e[i], computed[i], tail)
    # random weights: nothing can be trusted to stop, so nothing stays truncated
    assert InferenceEngine(tiny).predict_scaled(g, e)[1].min() == 150
    # without the check the random model's tail is cut (what the benchmark reports as tail_rel)
    _, cut = InferenceEngine(tiny, verify_tail=False).predict_scaled(g, e)
    assert (cut < 150).any()
