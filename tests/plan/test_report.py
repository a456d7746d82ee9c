"""The plan page: self-contained HTML with slices and slider, DVHs, gamma (2%/2mm/10%), timings."""

from __future__ import annotations

import numpy as np
import pytest

from dota.plan.dvh import compute_dvh
from dota.plan.geometry import ct_from_array
from dota.plan.report import plan_gamma, write_plan_report
from dota.plan.structures import Structure, sphere_mask


def _case():
    ct = ct_from_array(np.zeros((30, 40, 40), np.float32), (2.5, 2.0, 2.0), origin_mm=(-39, -39, -36.25))
    idx = np.indices(ct.shape).reshape(3, -1).T
    xyz = ct.index_to_patient(idx).reshape(*ct.shape, 3)
    dose = 2.0 * np.exp(-np.sum((xyz / np.array([12.0, 15.0, 10.0])) ** 2, axis=-1))
    return ct, dose


def test_gamma_identical_and_shifted():
    ct, dose = _case()
    same = plan_gamma(dose, dose, ct)
    assert same.pass_rate_percent == 100.0 and same.evaluated > 1000
    assert np.isnan(same.gamma[0, 0, 0])  # below the 10 % cutoff: not evaluated
    shifted = np.roll(dose, 3, axis=2)  # 6 mm along x: beyond 2 mm
    assert plan_gamma(dose, shifted, ct).pass_rate_percent < 80.0
    assert plan_gamma(dose, 1.01 * dose, ct).pass_rate_percent == 100.0  # 1 % within 2 %


def test_gamma_inside_the_patient_leaves_out_the_air():
    ct, dose = _case()
    ct.hu[:, :, :20] = -1000.0  # air on one side of the dose
    g = plan_gamma(dose, np.roll(dose, 2, axis=2), ct)  # 4 mm along x: fails on the slopes of the dose
    evaluated = np.isfinite(g.gamma)
    inside = evaluated & (ct.hu > -900)
    assert 0 < g.evaluated_in_patient == inside.sum() < g.evaluated == evaluated.sum()
    assert g.pass_rate_in_patient_percent == pytest.approx(100.0 * np.mean(g.gamma[inside] <= 1))
    assert g.pass_rate_percent == pytest.approx(100.0 * np.mean(g.gamma[evaluated] <= 1))
    assert g.pass_rate_in_patient_percent != pytest.approx(g.pass_rate_percent)
    assert np.isnan(plan_gamma(dose, dose, ct_from_array(np.full(ct.shape, -1000.0, np.float32), ct.spacing_mm,
                                                     origin_mm=ct.origin_mm)).pass_rate_in_patient_percent)


def test_report_page_is_self_contained(tmp_path):
    ct, dose = _case()
    s = Structure("core", sphere_mask(ct, (0, 0, 0), 8))
    page = write_plan_report(tmp_path / "r", ct, dose, structures=[s], dvhs=[compute_dvh(dose, s, 10.0)],
                             reference_gy=dose * 1.005, timings_s={"read": 0.1, "infer": 1.5},
                             summary={"beams": 2}, title="test")
    text = page.read_text()
    assert text.count("type='range'") == 3 and text.count("data:image/png;base64,") >= 3 + 3 + 1
    assert "pass rate <b>100.00 %</b>" in text and "infer" in text and "core" in text
    assert "inside the patient <b>100.00 %</b>" in text
    assert "http" not in text.replace("http-equiv", "")
    assert (tmp_path / "r" / "dvh.png").is_file()


def test_reference_noise_predicts_what_an_exact_dose_passes():
    """Against the mean of noisy runs, an error-free dose passes about what the noise ceiling says."""
    from dota.errors import InputError
    from dota.plan.report import reference_noise

    ct, truth = _case()
    rng = np.random.default_rng(3)
    sigma = 0.08 * truth.max()  # per run; the mean of 4 has 4 % of the maximum
    runs = [truth + sigma * rng.standard_normal(truth.shape) for _ in range(4)]
    noise = reference_noise(truth, runs, ct)
    assert noise.runs == 4 and noise.sigma_percent == pytest.approx(4.0, rel=0.1)
    actual = plan_gamma(truth, np.mean(runs, axis=0), ct).pass_rate_percent
    assert 70.0 < actual < 99.0  # the noise matters at this level
    assert noise.ceiling.pass_rate_percent == pytest.approx(actual, abs=1.5)
    # more runs: less noise, a higher ceiling; little noise: no cost
    more = reference_noise(truth, runs + [truth + sigma * rng.standard_normal(truth.shape) for _ in range(12)], ct)
    assert more.sigma_percent < noise.sigma_percent and more.ceiling.pass_rate_percent > noise.ceiling.pass_rate_percent
    quiet = reference_noise(truth, [truth + 0.002 * truth.max() * rng.standard_normal(truth.shape) for _ in range(2)], ct)
    assert quiet.ceiling.pass_rate_percent == 100.0
    with pytest.raises(InputError, match="two or more"):
        reference_noise(truth, runs[:1], ct)
