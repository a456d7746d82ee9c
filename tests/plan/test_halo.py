"""The out-of-block halo: the shipped table, the patch it gives, its fit, and its place in plan dose."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dota.engines import DoseEngine, get_engine
from dota.errors import DataFileError, InputError
from dota.plan.dose import compute_plan_dose
from dota.plan.geometry import ct_from_array
from dota.plan.halo import (
    HALO_SIGMAS_MM,
    HaloTable,
    default_halo_table,
    fit_halo,
    gaussian_rows,
    halo_patch,
    read_halo_table,
    ring_norms,
)
from dota.plan.model import Beam, EnergyLayer, Plan

VOXEL = (2.0, 2.0, 2.0)


def test_shipped_table_covers_the_engines_and_holds_what_mcsquare_measured():
    t = default_halo_table()
    assert t.energies_mev[0] <= 70 and t.energies_mev[-1] >= 225
    assert t.block_hw == (24, 24) and t.grid_hw[0] > 24
    assert np.all(t.weights >= 0) and np.all(np.isfinite(t.weights))
    fractions = t.meta["out_of_block_fraction"]
    assert all(0.02 < v < 0.08 for v in fractions.values())  # 3.3-5.2 % measured in water
    # at mid-range, the tabulated out-of-block fraction is of the same size as the measured whole-beamlet one
    for e in (70.0, 150.0, 225.0):
        assert 0.015 < t.at(e, np.array([0.5])).sum() < 0.1


def test_patch_keeps_the_tabulated_integral_and_leaves_the_block_empty():
    t = default_halo_table()
    length = 150
    in_block = np.zeros((2, length))
    in_block[0, :60] = np.linspace(1.0, 3.0, 60)
    in_block[1, :90] = 0.5
    wed = (np.arange(length) + 0.5) * 2.0
    energies = np.array([110.0, 140.0])
    patch = halo_patch(in_block, wed, energies, t, VOXEL)
    r0 = (t.grid_hw[0] - 24) // 2
    assert patch.shape == (90, *t.grid_hw)  # nothing below where the spot's blocks have dose
    assert np.all(patch[:, r0:r0 + 24, r0:r0 + 24] == 0) and np.all(patch >= 0)
    from dota.physics import csda_range_mm

    want = sum(in_block[i, :, None] * t.at(float(e), wed / csda_range_mm(float(e))) for i, e in enumerate(energies))
    np.testing.assert_allclose(patch.sum(axis=(1, 2)), want[:90].sum(axis=1), rtol=1e-9, atol=1e-12)
    assert np.all(want[90:] == 0)
    assert halo_patch(np.zeros((2, length)), wed, energies, t, VOXEL).shape == (0, *t.grid_hw)
    # off-centre axis: the halo follows it (more on the side it moved to), integral nearly kept
    shifted = halo_patch(in_block, wed, energies, t, VOXEL, residual=(0.0, 0.5))
    assert shifted[:, :, -r0:].sum() > patch[:, :, -r0:].sum()
    assert shifted.sum() == pytest.approx(patch.sum(), rel=0.02)


def test_patch_is_the_sum_of_its_gaussians_voxel_by_voxel():
    """The patch, written out term by term: per energy, depth and basis Gaussian, that Gaussian's voxel fractions
    along rows times along columns (around the off-centre axis), its tabulated fraction of the slice's in-block
    dose over its ring norm; the block left empty."""
    from dota.physics import csda_range_mm

    t = default_halo_table()
    length, residual = 70, (0.3, -0.4)
    rng = np.random.default_rng(5)
    in_block = rng.uniform(0.1, 1.0, (3, length))
    in_block[2, 50:] = 0.0
    wed = np.cumsum(rng.uniform(1.0, 3.0, length))
    energies = np.array([95.0, 120.0, 80.0])
    norms = ring_norms(t, VOXEL)
    patch = halo_patch(in_block, wed, energies, t, VOXEL, residual=residual)
    (big, _), r0 = t.grid_hw, (t.grid_hw[0] - 24) // 2
    ry = (np.arange(big) - (big - 1) / 2.0 - residual[0]) * VOXEL[1]
    cx = (np.arange(big) - (big - 1) / 2.0 - residual[1]) * VOXEL[2]
    want = np.zeros((length, big, big))
    for i, e in enumerate(energies):
        w = t.at(float(e), wed / float(csda_range_mm(float(e))))
        for j, s in enumerate(t.sigmas_mm):
            plane = np.outer(gaussian_rows(ry, VOXEL[1], s), gaussian_rows(cx, VOXEL[2], s)) * VOXEL[1] * VOXEL[2]
            want += (in_block[i] * w[:, j] / norms[j])[:, None, None] * plane[None]
    want[:, r0:r0 + 24, r0:r0 + 24] = 0.0
    np.testing.assert_allclose(patch, want, rtol=1e-12, atol=1e-15 * float(want.max()))


def test_fit_recovers_a_known_halo():
    """A synthetic beamlet: a narrow core plus 4 % in a 25 mm Gaussian; the fit puts back what lies outside."""
    big = 80
    y = (np.arange(big) - (big - 1) / 2.0) * 2.0
    core = gaussian_rows(y, 2.0, np.array(4.0))[:, None] * gaussian_rows(y, 2.0, np.array(4.0))[None, :]
    wide = gaussian_rows(y, 2.0, np.array(25.0))[:, None] * gaussian_rows(y, 2.0, np.array(25.0))[None, :]
    slice_ = 0.96 * core + 0.04 * wide
    dose = np.repeat(slice_[None] * 4.0, 60, axis=0)  # 120 mm deep, flat
    weights, diag = fit_halo(dose, 150.0, VOXEL, (24, 24), np.array([0.0, 0.25, 0.5]))
    inside = np.zeros((big, big), bool)
    inside[28:52, 28:52] = True
    want = slice_[~inside].sum() / slice_[inside].sum()
    np.testing.assert_allclose(weights.sum(axis=1), want, rtol=1e-3)
    assert diag["out_fraction"] == pytest.approx(slice_[~inside].sum() / slice_.sum(), rel=1e-6)
    assert max(diag["rms_error_of_max"]) < 0.02


def test_table_errors_are_one_line(tmp_path):
    with pytest.raises(DataFileError, match="cannot read the halo table"):
        read_halo_table(tmp_path / "missing.json")
    t = default_halo_table()
    bad = json.loads(t.to_json())
    bad["weights"] = bad["weights"][:-1]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(DataFileError, match="do not match") as err:
        read_halo_table(path)
    assert "\n" not in str(err.value)
    path.write_text(t.to_json())
    back = read_halo_table(path)
    np.testing.assert_allclose(back.weights, t.weights, atol=1e-7)
    assert isinstance(back, HaloTable) and back.sigmas_mm.tolist() == list(HALO_SIGMAS_MM)


def test_ring_norms_are_the_out_of_block_part_of_each_gaussian():
    t = default_halo_table()
    from scipy.special import ndtr

    norms = ring_norms(t, VOXEL)
    s = np.asarray(t.sigmas_mm)
    window = ndtr(t.grid_hw[0] / s) - ndtr(-t.grid_hw[0] / s)  # +-80 mm: half-width grid_hw * 2 mm / 2
    box = ndtr(24.0 / s) - ndtr(-24.0 / s)
    np.testing.assert_allclose(norms, window**2 - box**2, rtol=1e-9, atol=1e-15)


class InBlockEngine(DoseEngine):
    """The analytic dose, declared as in-block Monte Carlo: plan dose adds its halo."""

    name = "in-block"
    mcsquare_blocks = True

    def __init__(self):
        self.inner = get_engine("analytic")

    def dose(self, geometry, energies, voxel_mm=VOXEL, *, seeds=None):
        return self.inner.dose(geometry, energies, voxel_mm)


def _water_ct():
    """Water 200 mm wide and high (the halo window is +-80 mm), 134 mm deep behind 10 mm of air."""
    hu = np.full((100, 72, 100), -1000.0, np.float32)
    hu[:, 5:, :] = 0.0
    return ct_from_array(hu, (2.0, 2.0, 2.0), origin_mm=(-99.0, -71.0, -99.0))


def test_plan_dose_adds_the_halo_only_for_in_block_engines():
    ct = _water_ct()
    xy = [[x, y] for x in (-6.0, 0.0, 6.0) for y in (-6.0, 0.0, 6.0)]
    plan = Plan([Beam("b", 0.0, 0.0, (0.0, 0.0, 0.0), [EnergyLayer(120.0, xy, np.ones(9))])])
    plain = compute_plan_dose(ct, plan, get_engine("analytic"))
    assert plain.stats["halo"] is False and "halo_fraction" not in plain.stats
    with_halo = compute_plan_dose(ct, plan, InBlockEngine(), entrance_spot=False)
    assert with_halo.stats["halo"] is True and "halo" in with_halo.timings_s
    added = with_halo.dose_gy.sum(dtype=np.float64) / plain.dose_gy.sum(dtype=np.float64) - 1.0
    assert 0.025 < added < 0.06  # the table's 3-5 %
    assert with_halo.stats["halo_fraction"] == pytest.approx(added / (1 + added), rel=0.05)
    off = compute_plan_dose(ct, plan, InBlockEngine(), halo=False, entrance_spot=False)
    np.testing.assert_array_equal(off.dose_gy, plain.dose_gy)
    # the added dose lies outside the spots' blocks: far off the field it is the only dose
    far = np.abs(ct.index_to_patient(np.argwhere(np.ones(ct.shape, bool)))[:, 0]).reshape(ct.shape) > 50
    assert plain.dose_gy[far].max() < 1e-6 * plain.dose_gy.max() < with_halo.dose_gy[far].max()


def test_which_engines_need_the_halo():
    from dota.engines.learned import LearnedEngine

    assert get_engine("analytic").mcsquare_blocks is False
    assert LearnedEngine().mcsquare_blocks is True  # the shipped model learned MCsquare's in-block dose
    assert LearnedEngine("tiny").mcsquare_blocks is False
    assert LearnedEngine("tiny", mcsquare_blocks=True).mcsquare_blocks is True


def test_entrance_spot_delta_follows_the_beam_model():
    from dota.engines.analytic import beam_model_spot
    from dota.plan.dose import entrance_spot_delta_mm2

    assert entrance_spot_delta_mm2(150.0, 0.0) == pytest.approx((0.0, 0.0), abs=1e-12)
    rows, cols = entrance_spot_delta_mm2(150.0, 100.0)
    (_, r0, c0), _ = beam_model_spot(150.0)
    (_, r1, c1), _ = beam_model_spot(150.0, 100.0)
    assert (rows, cols) == pytest.approx((r0**2 - r1**2, c0**2 - c1**2))
    assert 0 < rows < cols  # narrower upstream, more so across the gantry axis (the beam model's x)
    assert entrance_spot_delta_mm2(150.0, -50.0)[1] < 0  # beyond the isocentre the spot is wider
    # at depth z in both blocks the beam's own angular spread has drifted on: delta grows as 2 theta^2 u z
    from dota.engines.mcsquare import beam_model_path, read_beam_model

    bm = read_beam_model(beam_model_path())
    energy = bm.column("NominalEnergy")
    for z in (40.0, 120.0):
        deeper = np.array(entrance_spot_delta_mm2(150.0, 100.0, z)) - (rows, cols)
        theta = [float(np.interp(150.0, energy, bm.column(f"Divergence1{axis}"))) for axis in ("y", "x")]
        np.testing.assert_allclose(deeper, 2 * np.square(theta) * 100.0 * z, rtol=1e-6)
    assert entrance_spot_delta_mm2(150.0, 0.0, 80.0) == pytest.approx((0.0, 0.0), abs=1e-12)


def _smooth_block(var_mm2: float = 16.0, length: int = 40) -> np.ndarray:
    """(1, L, 24, 24): a lateral Gaussian times a depth profile that falls to ~0 at both ends, as beamlets do."""
    x = (np.arange(24) - 11.5) * 2.0
    z = (np.arange(length) - (length - 1) / 2) * 2.0
    g = np.exp(-0.5 * x**2 / var_mm2)
    return (np.exp(-0.5 * z**2 / 40.0)[:, None, None] * (g[:, None] * g[None, :])[None])[None]


def test_entrance_correction_keeps_the_integral_and_narrows_by_delta():
    """The sharpening is a Gaussian deconvolution: the integral kept (gain 1 at zero frequency), the variance
    lower by delta across (entrance spot + resampling blur h^2/4) and by h^2/4 along the beam."""
    from dota.plan.dose import _entrance_spot_correction, depth_blur_mm2, entrance_spot_delta_mm2

    block = _smooth_block()
    out = _entrance_spot_correction(block, np.array([150.0]), 100.0, VOXEL)[0]
    # per slice the delta at its depth (+ h^2/4, the resampling blur); the projection's variance drops by their
    # mean weighted by the slices' dose
    depth = (np.arange(block.shape[1]) + 0.5) * VOXEL[0]
    per_slice = np.array([entrance_spot_delta_mm2(150.0, 100.0, z) for z in depth]) + 4.0 / 4.0
    mass = block[0].sum(axis=(1, 2))
    d_rows, d_cols = mass @ per_slice / mass.sum()
    np.testing.assert_allclose(out.sum(dtype=np.float64), block.sum(dtype=np.float64), rtol=1e-6)

    def var(a, axis):  # of the projection on one axis (0 depth, 1 rows, 2 cols)
        p = a.sum(axis=tuple(i for i in range(3) if i != axis))
        x = np.arange(len(p)) * 2.0
        m = (p * x).sum() / p.sum()
        return (p * (x - m) ** 2).sum() / p.sum()

    assert var(block[0], 1) - var(out, 1) == pytest.approx(d_rows, rel=1e-3)
    assert var(block[0], 2) - var(out, 2) == pytest.approx(d_cols, rel=1e-3)
    assert var(block[0], 0) - var(out, 0) == pytest.approx(depth_blur_mm2(VOXEL), rel=1e-3)
    assert depth_blur_mm2(VOXEL) == 1.0


def test_the_sharpening_grows_with_depth_as_the_spots_drift():
    """Each slice narrows by the delta at its own depth: the plan's spot entered upstream and its angular spread
    has drifted less far than in the block simulated from the isocentre (the head-and-neck plan: 97.89 -> 98.13 %
    when this replaced one delta for all depths)."""
    from dota.plan.dose import _entrance_spot_correction, entrance_spot_delta_mm2

    x = (np.arange(24) - 11.5) * 2.0
    g = np.exp(-0.5 * x**2 / 25.0)
    block = np.repeat((g[:, None] * g[None, :])[None], 80, axis=0)[None]  # the same spot in every slice
    out = _entrance_spot_correction(block, np.array([150.0]), 120.0, VOXEL)[0]

    def var(plane, axis):
        p = plane.sum(axis=1 - axis)
        m = (p * x).sum() / p.sum()
        return (p * (x - m) ** 2).sum() / p.sum()

    drops = []
    for slice_index in (10, 60):
        z = (slice_index + 0.5) * VOXEL[0]
        want = np.array(entrance_spot_delta_mm2(150.0, 120.0, z)) + 1.0
        got = [var(block[0, slice_index], a) - var(out[slice_index], a) for a in (0, 1)]
        np.testing.assert_allclose(got, want, rtol=2e-3)
        drops.append(got)
    assert np.all(np.subtract(drops[1], drops[0]) > 0.25)  # 100 mm deeper: 0.3 mm^2 more along both axes


def test_the_sharpening_is_exact_where_first_order_is_not():
    """A 3 mm^2 Gaussian blur of a spot (sigma 3.5 -> 3.9 mm) undone: by the Fourier deconvolution to 0.1 % of the
    maximum, where the first-order step of second differences (plans before session 12) leaves 100x more."""
    from dota.plan.dose import _second_difference, _sharpen_sums

    x = (np.arange(24) - 11.5) * 2.0

    def spot(var):
        g = np.exp(-0.5 * x**2 / var)
        g2 = g[:, None] * g[None, :]
        return g2 / g2.sum()

    depth = np.exp(-0.5 * ((np.arange(30) - 14.5) * 2.0) ** 2 / 60.0)
    wide = depth[:, None, None] * spot(15.0)[None]
    out = _sharpen_sums(np.stack([wide, 0 * wide, 0 * wide]), np.array([3.0, 3.0]), None, VOXEL)
    lateral = out / out.sum(axis=(1, 2), keepdims=True)  # depth and lateral act separately on this product
    error = np.abs(lateral - spot(12.0)[None]).max() / spot(12.0).max()
    first = wide - 1.5 * (_second_difference(wide, 1) + _second_difference(wide, 2)) / 4.0
    first_error = np.abs(first / first.sum(axis=(1, 2), keepdims=True) - spot(12.0)[None]).max() / spot(12.0).max()
    assert error < 1e-3 and first_error > 100 * error


def test_entrance_correction_adds_no_dose_to_noisy_beamlets():
    """A Monte Carlo beamlet's noise has large second differences: clipping each corrected beamlet at zero
    (as dota did) added dose (PTV +2.5 % on a head-and-neck plan of 1e4-proton MCsquare beamlets). The
    correction keeps each block's integral, noise or not."""
    from dota.plan.dose import _entrance_spot_correction

    rng = np.random.default_rng(0)
    smooth = _smooth_block()
    noisy = smooth * rng.poisson(20.0, smooth.shape) / 20.0
    out = _entrance_spot_correction(noisy, np.array([120.0]), 100.0, VOXEL)
    # kept to the little the sharpened noise spills beyond the block's crop (1e-4), against the +2.5 % of clipping
    np.testing.assert_allclose(out.sum(dtype=np.float64), noisy.sum(dtype=np.float64), rtol=2e-4)
    assert out.min() < 0  # the sharpened noise dips below zero: only the plan's total is clipped


def test_plan_dose_corrects_the_entrance_spot_for_mcsquare_blocks_only():
    ct = _water_ct()
    plan = Plan([Beam("b", 0.0, 0.0, (0.0, 0.0, 0.0), [EnergyLayer(150.0, [[0.0, 0.0]], [1.0])])])
    plain = compute_plan_dose(ct, plan, InBlockEngine(), halo=False, entrance_spot=False)
    sharp = compute_plan_dose(ct, plan, InBlockEngine(), halo=False)
    assert sharp.stats["entrance_spot"] is True and plain.stats["entrance_spot"] is False
    assert get_engine("analytic").mcsquare_blocks is False
    np.testing.assert_allclose(sharp.dose_gy.sum(dtype=np.float64), plain.dose_gy.sum(dtype=np.float64), rtol=2e-3)
    assert sharp.dose_gy.max() > 1.03 * plain.dose_gy.max()  # the block enters ~70 mm before the isocentre
    assert sharp.dose_gy.min() >= 0.0


def test_dij_reproduces_a_sheared_entrance_corrected_plan():
    """The matrix carries each beamlet as the plan dose does (along its ray, entrance-corrected, its small negative
    tails kept; both clip the total at zero): the same dose, also through bone, off-lattice spots and couch rotations."""
    hu = np.full((60, 60, 60), -1000.0, np.float32)
    hu[5:-5, 5:-5, 5:-5] = 0.0
    hu[20:35, 25:40, 30:42] = 900.0  # bone
    ct = ct_from_array(hu, (2.5, 3.0, 3.0), origin_mm=(-88.5, -88.5, -73.75))
    beams = [Beam("a", 90.0, 30.0, (0.0, 0.0, 0.0), [EnergyLayer(120.0, [[30.3, -20.0], [0.0, 1.1]], [1.0, 0.7]),
                                                       EnergyLayer(135.0, [[30.3, -20.0], [6.0, 6.0]], [0.5, 1.1])]),
             Beam("b", 215.0, -20.0, (5.0, -4.0, 2.0), [EnergyLayer(110.0, [[-24.0, 12.5], [3.0, -9.0]], [0.4, 0.9])]),
             Beam("c", 0.0, 0.0, (0.0, 0.0, 0.0), [EnergyLayer(100.0, [[12.0, 0.0]], [1.3])])]
    plan = Plan(beams, fractions=2)
    r = compute_plan_dose(ct, plan, InBlockEngine(), dij=True, dij_threshold=0.0)
    assert r.stats["entrance_spot"] and r.stats["source_axis_mm"] is not None and not r.stats["halo"]
    np.testing.assert_allclose(r.dij.dose(), r.dose_gy, rtol=1e-4, atol=1e-6 * r.dose_gy.max())
    with pytest.raises(InputError, match="leaves out the halo"):
        compute_plan_dose(ct, plan, InBlockEngine(), dij=True, halo=True)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(energies_mev=d["energies_mev"][::-1]), "energies not ascending"),
    (lambda d: d.update(sigmas_mm=[-1.0] + d["sigmas_mm"][1:]), "width <= 0"),
    (lambda d: d.update(grid_hw=[81, 81]), "even number"),
    (lambda d: d.update(grid_hw=[80, 70]), "not square"),
])
def test_invalid_halo_tables_are_refused(tmp_path, edit, message):
    data = json.loads(default_halo_table().to_json())
    edit(data)
    path = tmp_path / "t.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataFileError, match=message):
        read_halo_table(path)


def test_the_shipped_model_by_path_gets_the_corrections_too():
    from dota.checkpoint import default_model_path
    from dota.engines.learned import LearnedEngine

    assert LearnedEngine(str(default_model_path())).mcsquare_blocks is True


def test_a_copy_of_the_shipped_model_gets_the_corrections_too(tmp_path):
    """The shipped file copied elsewhere is the same model (found: a copy lost the halo and entrance-spot
    corrections, and the head-and-neck plan fell from 97.9 to 88.5 %)."""
    import shutil

    from dota.checkpoint import default_model_path, read_checkpoint_metadata
    from dota.engines.learned import LearnedEngine

    copy = shutil.copy(default_model_path(), tmp_path / "my_model.safetensors")
    assert read_checkpoint_metadata(copy)["extra"]["data_engines"] == ["mcsquare"]
    assert LearnedEngine(str(copy)).mcsquare_blocks is True


def test_a_checkpoint_records_its_training_data_engine(tmp_path):
    """A model a user trains on MCsquare blocks gets MCsquare's block corrections in plans without a flag
    (found: a fine-tuned default model, loaded by path, lost them and its plan fell 10 gamma points)."""
    from dota.checkpoint import load_model, save_model
    from dota.engines.learned import LearnedEngine

    model = load_model("tiny", seed=0)
    for engines, expected in ((["mcsquare"], True), (["analytic"], False), (["analytic", "mcsquare"], False)):
        path = save_model(model, tmp_path / f"{'-'.join(engines)}.safetensors", extra={"data_engines": engines})
        assert LearnedEngine(str(path)).mcsquare_blocks is expected
    old = save_model(model, tmp_path / "old.safetensors", extra={"epoch": 3})  # no record: as before
    assert LearnedEngine(str(old)).mcsquare_blocks is False


def test_training_writes_the_data_engine_into_its_checkpoints(small_h5, tmp_path):
    from dota.checkpoint import read_checkpoint_metadata
    from dota.data.hdf5 import BeamletFile
    from dota.train import TrainConfig, train

    with BeamletFile(small_h5) as f:
        engine = f.attrs["engine"]
    summary = train(small_h5, tmp_path / "run", TrainConfig(preset="tiny", epochs=1, batch_size=4,
                                                           validate_cache_beamlets=0), progress=False)
    assert read_checkpoint_metadata(summary["best_checkpoint"])["extra"]["data_engines"] == [engine]


def test_the_corrected_spot_is_the_sum_of_corrected_blocks():
    """One correction of the weighted sums (the plan's fast path) equals correcting each energy's block and
    summing them (what the dose-influence matrix holds)."""
    from dota.plan.dose import _corrected_spot, _entrance_spot_correction

    rng = np.random.default_rng(4)
    part = rng.random((5, 40, 24, 24)).astype(np.float32)
    energies, weights = np.array([80.0, 95.0, 110.0, 130.0, 150.0]), rng.random(5) * 3
    each = np.tensordot(weights, _entrance_spot_correction(part, energies, 120.0, VOXEL), axes=(0, 0))
    np.testing.assert_allclose(_corrected_spot(part, weights, energies, 120.0, VOXEL), each, rtol=0,
                               atol=1e-6 * np.abs(each).max())  # the sharpening's FFTs are float32
