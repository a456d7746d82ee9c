"""The lateral calibration (dota.plan.lateral) and the blur compensations of plan deposition (dota.plan.dose)."""

from __future__ import annotations

import numpy as np
import pytest

from dota.data.hdf5 import BeamletData
from dota.errors import InputError

VOXEL = (2.0, 2.0, 2.0)
X = (np.arange(24) - 11.5) * 2.0


def gaussian_block(var_rows: float, var_cols: float, length: int = 6) -> np.ndarray:
    g_r = np.exp(-0.5 * X**2 / var_rows)
    g_c = np.exp(-0.5 * X**2 / var_cols)
    return np.repeat((g_r[:, None] * g_c[None, :])[None], length, axis=0)  # (L, H, W)


def variance(a: np.ndarray, axis: int) -> float:
    p = a.sum(axis=(0, 2 - axis))
    x = np.arange(len(p)) * 2.0
    m = (p * x).sum() / p.sum()
    return float((p * (x - m) ** 2).sum() / p.sum())


class BlurredEngine:
    """Stands in for a model whose beamlets are Gaussians of a known width per energy."""

    def plan_dose(self, geometry, energies, voxel_mm=VOXEL, *, seeds=None):
        return np.stack([gaussian_block(6.0 + e / 20.0, 8.0 + e / 25.0, geometry.shape[1]) for e in energies]
                        ).astype(np.float32)


def sharpened(d: np.ndarray, rows: float, cols: float) -> np.ndarray:
    from dota.plan.dose import _second_difference

    return d - 0.5 * (rows * _second_difference(d, 1) + cols * _second_difference(d, 2)) / 4.0


def test_fit_recovers_a_known_width_excess_per_energy_bin():
    from dota.plan.lateral import fit_lateral_excess

    energies = np.array([75.0, 80.0, 120.0, 125.0, 128.0], dtype=np.float32)
    model = BlurredEngine().plan_dose(np.zeros((5, 6, 24, 24)), energies).astype(np.float64)
    truth = {75.0: (1.5, 2.5), 80.0: (1.5, 2.5), 120.0: (0.5, -0.25), 125.0: (0.5, -0.25), 128.0: (0.5, -0.25)}
    mc = np.stack([sharpened(model[i], *truth[float(e)]) for i, e in enumerate(energies)])
    data = BeamletData(geometry=np.zeros((5, 6, 24, 24), np.int16), energy=energies, dose=mc.astype(np.float64))
    rows = fit_lateral_excess(BlurredEngine(), data, (70, 100, 130), min_blocks=1, batch=2)
    assert [r["blocks"] for r in rows] == [2, 3]
    assert (rows[0]["rows_mm2"], rows[0]["cols_mm2"]) == pytest.approx((1.5, 2.5), abs=1e-3)
    assert (rows[1]["rows_mm2"], rows[1]["cols_mm2"]) == pytest.approx((0.5, -0.25), abs=1e-3)
    assert rows[0]["squared_error_removed_percent"] == pytest.approx(100.0, abs=1e-3)
    assert rows[0]["energy_mev"] == pytest.approx(77.5)
    merged = fit_lateral_excess(BlurredEngine(), data, (70, 100, 130), min_blocks=3)  # the 2-block bin joins
    assert len(merged) == 1 and merged[0]["blocks"] == 5 and merged[0]["edges_mev"] == [70.0, 130.0]


def test_fit_refuses_bad_bins_and_flat_blocks():
    from dota.plan.lateral import fit_lateral_excess

    data = BeamletData(geometry=np.zeros((2, 6, 24, 24), np.int16), energy=np.array([80.0, 90.0], np.float32),
                       dose=np.zeros((2, 6, 24, 24)))
    with pytest.raises(InputError, match="increasing"):
        fit_lateral_excess(BlurredEngine(), data, (100, 70))

    class Flat:
        def plan_dose(self, geometry, energies, voxel_mm=VOXEL, *, seeds=None):
            return np.zeros(geometry.shape, np.float32)  # no dose, no width

    with pytest.raises(InputError, match="no lateral dose gradients"):
        fit_lateral_excess(Flat(), data, (70, 100), min_blocks=1)


def test_the_engine_reads_its_table_and_refuses_a_broken_one(tmp_path):
    from dota.checkpoint import save_model
    from dota.engines.learned import LearnedEngine
    from dota.model import PRESETS, DoTA

    model = DoTA(PRESETS["tiny"])
    path = tmp_path / "m.safetensors"
    table = {"energy_mev": [80.0, 120.0], "rows_mm2": [2.0, 1.0], "cols_mm2": [3.0, 1.0], "data": "x.h5"}
    save_model(model, path, extra={"plan_lateral_mm2": table})
    excess = LearnedEngine(str(path)).lateral_excess_mm2(np.array([70.0, 100.0, 150.0]))
    np.testing.assert_allclose(excess, [[2.0, 3.0], [1.5, 2.0], [1.0, 1.0]])  # flat beyond the table
    plain = tmp_path / "plain.safetensors"
    save_model(model, plain)
    assert not LearnedEngine(str(plain)).lateral_excess_mm2(np.array([100.0])).any()
    bad = tmp_path / "bad.safetensors"
    save_model(model, bad, extra={"plan_lateral_mm2": {"energy_mev": [120.0, 80.0], "rows_mm2": [1, 1], "cols_mm2": [1, 1]}})
    with pytest.raises(InputError, match="lateral calibration"):
        LearnedEngine(str(bad))


def test_the_entrance_correction_also_removes_the_engines_excess():
    from dota.plan.dose import _corrected_spot, _entrance_spot_correction, entrance_spot_delta_mm2

    block = gaussian_block(16.0, 16.0, 3)[None]
    excess = np.array([[1.2, 0.4]])
    out = _entrance_spot_correction(block, np.array([150.0]), 100.0, VOXEL, excess)[0]
    depth = (np.arange(block.shape[1]) + 0.5) * VOXEL[0]  # every slice holds the same dose: the mean of their deltas
    d_rows, d_cols = np.mean([entrance_spot_delta_mm2(150.0, 100.0, z) for z in depth], axis=0) + 1.0 + excess[0]
    assert variance(block[0], 0) - variance(out, 0) == pytest.approx(d_rows, rel=2e-3)
    assert variance(block[0], 1) - variance(out, 1) == pytest.approx(d_cols, rel=2e-3)
    summed = _corrected_spot(block, np.array([2.0]), np.array([150.0]), 100.0, VOXEL, excess)
    np.testing.assert_allclose(summed, 2.0 * out, rtol=0, atol=1e-6 * np.abs(out).max())  # float32 FFTs


@pytest.mark.parametrize("residual", [(0.5, 0.3), (-0.25, 0.0), (0.0, -0.4)])
def test_the_splat_blur_is_compensated(residual, monkeypatch):
    """A dose block splatted bilinearly to a fractional position f gains f (1 - f) h^2 of variance (plans had
    left it in: up to 1 mm^2 on the 2 mm grid); sharpened by splat_blur_mm2 first, it keeps its width."""
    from dota.plan.bev import splat_window
    from dota.plan.dose import _corrected_spot, _entrance_spot_correction, splat_blur_mm2

    block = gaussian_block(10.0, 12.0, 4)
    blur = splat_blur_mm2(residual, None, len(block), VOXEL)
    f = np.abs(np.asarray(residual))
    np.testing.assert_allclose(blur, np.repeat((f * (1 - f) * 4.0)[None], 4, axis=0))
    plain, _, _ = splat_window(block, residual)
    fixed, _, _ = splat_window(sharpened(block, *blur[0]), residual)
    for axis in (0, 1):
        assert variance(plain, axis) - variance(block, axis) == pytest.approx(blur[0, axis], abs=1e-6)
        assert variance(fixed, axis) == pytest.approx(variance(block, axis), abs=2e-3)
    assert fixed.sum() == pytest.approx(block.sum(), rel=1e-9)
    # the plan folds it into the entrance correction, per slice (spot sums and the matrix's single blocks alike)
    energies, weights = np.array([120.0, 150.0]), np.array([1.0, 0.5])
    parts = np.stack([block, 0.7 * block])
    both = _corrected_spot(parts, weights, energies, 100.0, VOXEL, None, blur)
    alone = _corrected_spot(parts, weights, energies, 100.0, VOXEL)
    for axis in (0, 1):  # the splat's blur taken off on top (a Gaussian deconvolution: variances subtract) ...
        assert variance(alone, axis) - variance(both, axis) == pytest.approx(blur[0, axis], rel=0.02, abs=1e-3)
    each = np.tensordot(weights, _entrance_spot_correction(parts, energies, 100.0, VOXEL, None, blur), axes=(0, 0))
    np.testing.assert_allclose(both, each, rtol=0, atol=1e-6 * np.abs(each).max())  # float32 FFTs
    sheared = splat_blur_mm2((0.2, 0.0), np.array([[0.3, 0.0], [0.8, 1.5]]), 2, VOXEL)
    np.testing.assert_allclose(sheared, [[0.25 * 4, 0.0], [0.0, 0.25 * 4]])
    monkeypatch.setattr("dota.plan.dose.SHARPEN_MAX_GAIN", 1e12)  # ... exactly without the gain's cap
    exact = [_corrected_spot(parts, weights, energies, 100.0, VOXEL, None, b) for b in (blur, None)]
    for axis in (0, 1):
        assert variance(exact[1], axis) - variance(exact[0], axis) == pytest.approx(blur[0, axis], rel=5e-3, abs=1e-4)
