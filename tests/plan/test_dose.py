"""The plan-dose pipeline: beam directions on a phantom, MU scaling, chunking, geometry sharing, dij."""

from __future__ import annotations

import os

import numpy as np
import pytest

from dota.engines import DoseEngine, get_engine
from dota.errors import InputError
from dota.plan.dij import load_dij
from dota.plan.dose import compute_plan_dose
from dota.plan.geometry import ct_from_array, read_patient_ct
from dota.plan.model import Beam, EnergyLayer, Plan, protons_per_mu

from .helpers import phantom_hu


def water_box(shape=(50, 90, 90), spacing=(2.0, 2.0, 2.0)):
    hu = np.full(shape, -1000.0, np.float32)
    hu[3:-3, 5:-5, 5:-5] = 0.0
    # voxel corners (not centres) on the isocentre: beam grid and CT grid coincide at gantry 0
    origin = tuple(-(n / 2 - 0.5) * s for n, s in zip(shape[::-1], spacing[::-1]))
    return ct_from_array(hu, spacing, origin)


def one_spot(gantry, couch=0.0, xy=(0.0, 0.0), energy=100.0, mu=1.0, fractions=1):
    return Plan([Beam("b", gantry, couch, (0.0, 0.0, 0.0), [EnergyLayer(energy, [xy], [mu])])], fractions=fractions)


def centroid(ct, dose, level=0.5):
    kji = np.argwhere(dose >= level * dose.max())
    return ct.index_to_patient(kji).mean(axis=0)


@pytest.fixture(scope="module")
def analytic():
    return get_engine("analytic")


@pytest.mark.parametrize("gantry, axis, sign", [(0, 1, -1), (90, 0, +1), (180, 1, +1), (270, 0, -1)])
def test_beam_enters_from_the_iec_side(analytic, gantry, axis, sign):
    """HFS: gantry 0 enters anteriorly (-y), 90 from the patient's left (+x), 180 posteriorly, 270 from the right."""
    ct = water_box()
    dose = compute_plan_dose(ct, one_spot(gantry, energy=90.0), analytic).dose_gy
    xyz = ct.index_to_patient(np.argwhere(dose > 0.01 * dose.max()))
    # 90 MeV stops after 64 mm of water; the skin is 80 mm from the isocentre: all dose on the entry side
    assert np.all(sign * xyz[:, axis] > 10.0)
    # the Bragg peak lies 80 - 64 = 16 mm from the isocentre, towards the entry side
    peak = ct.index_to_patient(np.array(np.unravel_index(np.argmax(dose), dose.shape)))
    assert sign * peak[axis] == pytest.approx(80.0 - 64.0, abs=4.0)


@pytest.mark.parametrize("gantry, xy, expected", [
    (0, (20.0, 0.0), (20.0, None, 0.0)),     # IEC X at gantry 0 is the patient's left (+x)
    (0, (0.0, -16.0), (0.0, None, -16.0)),   # IEC Y is superior (+z)
    (90, (20.0, 0.0), (None, 20.0, 0.0)),    # at gantry 90, X points down (posterior, +y)
])
def test_spot_position_lands_where_iec_puts_it(analytic, gantry, xy, expected):
    ct = water_box()
    c = centroid(ct, compute_plan_dose(ct, one_spot(gantry, xy=xy), analytic).dose_gy)
    for value, want in zip(c, expected):
        if want is not None:
            assert value == pytest.approx(want, abs=1.0)


def test_mu_to_protons_and_fractions(analytic):
    """On a CT grid that coincides with the beam grid, the plan dose is the engine's block dose times
    MU x ProtonsMU / 1e9 x fractions."""
    ct = water_box()
    r = compute_plan_dose(ct, one_spot(0, energy=120.0, mu=2.5, fractions=3), analytic)
    block = np.full((150, 24, 24), -1000.0, np.float32)
    block[1:1 + 80] = 0.0  # the block starts one voxel before the skin; the box is 80 voxels deep
    block_dose = analytic.dose(block, np.array([120.0]))[0]
    expected = block_dose.max() * 2.5 * float(protons_per_mu(120.0)) / 1e9 * 3
    assert r.dose_gy.max() == pytest.approx(expected, rel=1e-4)
    assert r.stats["max_lateral_residual_mm"] == 0.0


def test_chunking_does_not_change_the_dose(analytic):
    ct = read_ct_phantom()
    plan = Plan([Beam("b", 30, 0, (0, 0, 0), [EnergyLayer(e, [[x, y] for x in (-6, 0, 6) for y in (-6, 0, 6)],
                                                          np.linspace(0.5, 1.5, 9)) for e in (90, 100, 110)])])
    a = compute_plan_dose(ct, plan, analytic)
    b = compute_plan_dose(ct, plan, analytic, max_beamlets_per_call=1)
    assert a.stats["engine_calls"] == 1 and b.stats["engine_calls"] == 9  # one spot (3 layers) per call at least
    np.testing.assert_allclose(b.dose_gy, a.dose_gy, rtol=1e-5, atol=1e-7 * a.dose_gy.max())


def read_ct_phantom():
    return ct_from_array(phantom_hu(), (2.5, 3.0, 3.0), origin_mm=(-58.5, -58.5, -28.75))


class SpyEngine(DoseEngine):
    """Records every call; returns the analytic dose."""

    name = "spy"
    energy_range_mev = (70.0, 225.0)

    def __init__(self):
        self.calls, self.seeds = [], []
        self.inner = get_engine("analytic")

    def dose(self, geometry, energies, voxel_mm=(2.0, 2.0, 2.0), *, seeds=None):
        self.calls.append((geometry.copy(), energies.copy()))
        self.seeds.extend(seeds)
        return self.inner.dose(geometry, energies, voxel_mm)


def test_each_spot_goes_through_the_engine_as_one_repeated_block():
    ct = read_ct_phantom()
    spy = SpyEngine()
    layers = [EnergyLayer(90, [[0, 0], [8, 0]], [1, 1]), EnergyLayer(100, [[0, 0]], [1]),
              EnergyLayer(105, [[8, 0], [0, 0]], [1, 1])]
    compute_plan_dose(ct, Plan([Beam("b", 0, 0, (0, 0, 0), layers)]), spy, max_beamlets_per_call=3)
    assert len(spy.calls) == 2  # spot (0,0) has 3 layers, spot (8,0) has 2: they do not fit one call of 3
    for geometry, energies in spy.calls:
        assert np.all(geometry == geometry[0])  # one block repeated: the DoTA engine shares its geometry
        assert len(set(energies.tolist())) == len(energies)
    # every spot-energy its own Monte Carlo seed, across calls (a call's own indices would repeat them)
    assert len(spy.seeds) == 5 and len(set(spy.seeds)) == 5


def test_dij_reproduces_the_plan_dose(tmp_path, analytic):
    ct = read_ct_phantom()
    plan = Plan([Beam("a", 0, 0, (0, 0, 0), [EnergyLayer(100, [[0, 0], [6.4, -3.1]], [1.0, 0.5])]),
                 Beam("b", 75, 20, (0, 0, 0), [EnergyLayer(95, [[0, 0]], [2.0]), EnergyLayer(105, [[0, 0]], [1.0])])],
                fractions=2)
    r = compute_plan_dose(ct, plan, analytic, dij=True)
    assert r.dij.matrix.shape == (int(np.prod(ct.shape)), 4)
    np.testing.assert_allclose(r.dij.dose(), r.dose_gy, rtol=1e-4, atol=1e-6 * r.dose_gy.max())
    assert r.stats["max_lateral_residual_mm"] > 0  # off-lattice spot: splatted
    path = r.dij.save(tmp_path / "dij.npz")
    back = load_dij(path)
    assert back.matrix.nnz == r.dij.matrix.nnz and back.fractions == 2
    np.testing.assert_allclose(back.dose(), r.dose_gy, rtol=1e-4, atol=1e-6 * r.dose_gy.max())
    # a threshold keeps the matrix smaller and drops a reported, small part of the dose
    t = compute_plan_dose(ct, plan, analytic, dij=True, dij_threshold=1e-3)
    assert t.dij.matrix.nnz < 0.8 * r.dij.matrix.nnz
    assert 0 < t.dij.dropped_fraction < 0.01
    assert t.dij.dose().sum() == pytest.approx(r.dose_gy.sum(), rel=0.01)


def test_dota_engine_tiny_model_runs_a_plan():
    ct = read_ct_phantom()
    engine = get_engine("dota", model="tiny", seed=0)
    plan = Plan([Beam("b", 0, 0, (0, 0, 0), [EnergyLayer(e, [[0, 0], [6, 0]], [1, 1]) for e in (90, 110)])])
    r = compute_plan_dose(ct, plan, engine)
    assert r.dose_gy.shape == ct.shape and np.isfinite(r.dose_gy).all() and r.stats["engine_calls"] == 1
    with pytest.raises(InputError, match="outside the dota engine's range"):
        compute_plan_dose(ct, Plan([Beam("b", 0, 0, (0, 0, 0), [EnergyLayer(224, [[0, 0]], [1])])]), engine)


def test_dicom_ct_keeps_its_geometry(dicom_ct):
    ct = read_patient_ct(dicom_ct)
    assert ct.shape == (24, 40, 40) and ct.spacing_mm == (2.5, 3.0, 3.0)
    assert ct.origin_mm == pytest.approx((-70.5, -60.0, -30.0))
    np.testing.assert_allclose(ct.direction, np.eye(3))
    np.testing.assert_allclose(ct.hu, phantom_hu())
    assert ct.info["PatientID"] == "PT001" and ct.patient_position == "HFS" and "FrameOfReferenceUID" in ct.info


def test_spots_follow_their_rays_from_the_virtual_source(analytic):
    """An off-axis spot's dose moves outwards with depth as X * s / SAD (the beam model's SMX 2,234.8 mm across,
    SMY 1,859.1 mm along the gantry axis); parallel beams keep it at X. Integral dose is the same."""
    from dota.engines.analytic import beam_model_source_axis_mm

    smy, smx = beam_model_source_axis_mm()
    hu = np.full((60, 100, 60), -1000.0, np.float32)
    hu[:, 4:, :] = 0.0  # water from 92 mm before the isocentre (y = 0) on
    ct = ct_from_array(hu, (2.0, 2.0, 2.0), origin_mm=(-59.0, -99.0, -59.0))
    plan = Plan([Beam("b", 0.0, 0.0, (0.0, 0.0, 0.0), [EnergyLayer(150.0, [[40.0, -30.0]], [1.0])])])
    fan = compute_plan_dose(ct, plan, analytic).dose_gy
    par = compute_plan_dose(ct, plan, analytic, diverging=False).dose_gy
    assert fan.sum() == pytest.approx(par.sum(), rel=1e-3)
    for j in (6, 40, 70):  # slabs at y = -87, -19, +41 mm: depth s = y from the isocentre
        y = -99.0 + 2.0 * j
        for dose, factor in ((fan, 1.0), (par, 0.0)):
            sl = dose[:, j, :].astype(np.float64)
            kk, ii = np.indices(sl.shape)
            x_c = (sl * (-59.0 + 2.0 * ii)).sum() / sl.sum()
            z_c = (sl * (-59.0 + 2.0 * kk)).sum() / sl.sum()
            assert x_c == pytest.approx(40.0 * (1 + factor * y / smx), abs=0.15)
            assert z_c == pytest.approx(-30.0 * (1 + factor * y / smy), abs=0.15)


def test_sheared_cut_and_deposit():
    from dota.plan import bev

    grid = np.arange(10 * 8 * 8, dtype=np.float32).reshape(10, 8, 8)
    w = bev.SpotWindow(1, 2, 2, (0.0, 0.0))
    shifts = np.array([[0, 0], [0, 0], [1, -1], [1, -1], [2, 1]])
    block = bev.cut_block(grid, w, (5, 3, 3), shifts)
    for slice_, (dr, dc) in enumerate(shifts):
        np.testing.assert_array_equal(block[slice_], grid[1 + slice_, 2 + dr:5 + dr, 2 + dc:5 + dc])
    dose = np.zeros((10, 8, 8))
    frac = shifts + np.array([[0.25, -0.5]])
    bev.deposit_window(dose, w, np.ones((5, 3, 3)), frac)
    np.testing.assert_allclose(dose.sum(axis=(1, 2))[1:6], 9.0)  # each slice keeps its dose
    rows = np.arange(8)[None, :, None] * np.ones((1, 1, 8))
    centre_rows = (dose[1:6] * rows).sum(axis=(1, 2)) / 9.0
    np.testing.assert_allclose(centre_rows, 3.0 + frac[:, 0])  # the axis of each slice moved by its shift


def test_a_sheared_block_outside_its_grid_is_an_error_not_wrong_data():
    from dota.plan import bev

    grid = np.zeros((10, 8, 8), dtype=np.float32)
    with pytest.raises(InputError, match="outside its beam grid"):
        bev.cut_block(grid, bev.SpotWindow(0, 0, 0, (0.0, 0.0)), (5, 3, 3), np.array([[0, 0]] * 4 + [[-1, 0]]))


def test_sheared_blocks_still_start_in_air():
    """A block starts one slice before the body in its sheared footprint too (a sloping surface, spots far off axis)."""
    hu = np.full((80, 80, 60), -1000.0, np.float32)
    kk = np.arange(80)[:, None]
    jj = np.arange(80)[None, :]
    hu[np.broadcast_to((jj >= 20 + (kk - 40))[:, :, None], hu.shape)] = 0.0  # the surface slopes 45 deg along z
    ct = ct_from_array(hu, (2.0, 2.0, 2.0), origin_mm=(-59.0, -79.0, -79.0))
    spy = SpyEngine()
    plan = Plan([Beam("b", 0.0, 0.0, (0.0, 60.0, 0.0), [EnergyLayer(120.0, [[0.0, 50.0], [0.0, -50.0], [10.0, 20.0]],
                                                                   [1.0, 1.0, 1.0])])])
    compute_plan_dose(ct, plan, spy, halo=False)
    blocks = [g for call in spy.calls for g in call[0]]
    assert len(blocks) == 3
    for block in blocks:
        assert np.all(block[0] <= -400.0)  # no body in the first slice
        assert np.any(block[1] > -400.0) or np.any(block[2] > -400.0)


def test_halo_fraction_counts_only_what_lands_in_the_grid():
    from .test_halo import InBlockEngine

    hu = np.full((40, 40, 40), -1000.0, np.float32)
    hu[:, 2:, :] = 0.0  # 76 mm of water: a 200 MeV beam leaves the CT long before it stops
    ct = ct_from_array(hu, (2.0, 2.0, 2.0), origin_mm=(-39.0, -39.0, -39.0))
    plan = Plan([Beam("b", 0.0, 0.0, (0.0, 0.0, 0.0), [EnergyLayer(200.0, [[0.0, 0.0], [6.0, 0.0]], [1.0, 1.0])])])
    on = compute_plan_dose(ct, plan, InBlockEngine(), entrance_spot=False)
    off = compute_plan_dose(ct, plan, InBlockEngine(), entrance_spot=False, halo=False)
    grid_on, grid_off = on.stats["beam_grid_gy_mm3"], off.stats["beam_grid_gy_mm3"]
    assert on.stats["halo_fraction"] == pytest.approx((grid_on - grid_off) / grid_on, abs=1e-5)  # rounded to 5 places
    assert on.stats["halo_fraction"] < 0.06


def _multi_chunk_plan():
    return Plan([Beam("a", 30, 0, (0, 0, 0), [EnergyLayer(e, [[x, y] for x in (-6, 0, 6) for y in (-6, 0, 6)],
                                                          np.linspace(0.5, 1.5, 9)) for e in (90, 100, 110)]),
                 Beam("b", 280, 10, (0, 0, 0), [EnergyLayer(95, [[0, 0], [5, 5]], [1.0, 2.0])])], fractions=2)


@pytest.mark.parametrize("name", ["analytic", "dota"])
def test_worker_processes_give_the_same_dose_and_leave_torch_threads(name):
    """Engine calls in two worker processes, results deposited in plan order: the dose is the same (bit for
    bit for the analytic engine), whatever worker finished first, and this process's torch thread count is
    unchanged."""
    import torch

    from dota.plan.dose import DEFAULT_MAX_WORKERS, plan_workers

    ct = read_ct_phantom()
    if name == "dota":  # a model that puts dose everywhere: random weights with an active output layer
        engine = get_engine("dota", model="tiny-pb", seed=0)
        with torch.no_grad():
            engine.model.decoder.out.weight.normal_(0.0, 1e-3, generator=torch.Generator().manual_seed(1))
    else:
        engine = get_engine(name)
    assert engine.concurrent and plan_workers(engine, 2) == 2
    assert plan_workers(engine) == min(torch.get_num_threads(), DEFAULT_MAX_WORKERS)
    threads = torch.get_num_threads()
    try:  # the reference on the torch threads each of two workers gets: the same sums in the same order
        torch.set_num_threads(max(1, threads // 2))
        one = compute_plan_dose(ct, _multi_chunk_plan(), engine, max_beamlets_per_call=4, workers=1)
    finally:
        torch.set_num_threads(threads)
    two = compute_plan_dose(ct, _multi_chunk_plan(), engine, max_beamlets_per_call=4, workers=2)
    assert torch.get_num_threads() == threads
    assert one.stats["engine_calls"] == two.stats["engine_calls"] >= 8 and two.stats["workers"] == 2
    if name == "analytic":
        np.testing.assert_array_equal(two.dose_gy, one.dose_gy)
    else:  # each worker's engine has its own geometry caches, so batches differ: float32 rounding only
        assert np.abs(two.dose_gy - one.dose_gy).max() <= 1e-6 * one.dose_gy.max()
    assert one.dose_gy.max() > 0


def test_engines_that_cannot_share_threads_run_in_one():
    from dota.plan.dose import plan_workers

    spy = SpyEngine()
    assert not spy.concurrent and plan_workers(spy) == 1
    with pytest.raises(InputError, match="cannot run in several worker processes"):
        compute_plan_dose(read_ct_phantom(), one_spot(0), spy, workers=2)
    with pytest.raises(InputError, match="workers must be >= 1"):
        compute_plan_dose(read_ct_phantom(), one_spot(0), spy, workers=0)


class _WorkerTrouble(SpyEngine):
    """Runs in worker processes; fails (or dies) on the 110 MeV layer."""

    concurrent = True

    def __init__(self, how):
        super().__init__()
        self.how = how

    def dose(self, geometry, energies, voxel_mm=(2.0, 2.0, 2.0), *, seeds=None):
        if np.any(np.asarray(energies) == 110):
            if self.how == "raise":
                raise InputError("no 110 MeV beamlets here")
            os._exit(3)
        return self.inner.dose(geometry, energies, voxel_mm)


class _SlowFirstCall(SpyEngine):
    """Runs in worker processes; its first call (the plan's first chunk) returns only once two later calls
    have finished (each call leaves a file in ``folder``), or fails after 60 s."""

    concurrent = True

    def __init__(self, folder):
        super().__init__()
        self.folder, self.first_seeds = folder, None

    def dose(self, geometry, energies, voxel_mm=(2.0, 2.0, 2.0), *, seeds=None):
        import time

        if self.first_seeds is not None and list(seeds) == self.first_seeds:
            deadline = time.monotonic() + 60.0
            while len(list(self.folder.iterdir())) < 2:
                if time.monotonic() > deadline:
                    raise RuntimeError("the other worker got no new job while this one was busy")
                time.sleep(0.02)
        dose = self.inner.dose(geometry, energies, voxel_mm)
        (self.folder / f"call-{min(seeds)}").touch()
        return dose


def test_a_worker_that_replies_gets_the_next_job_while_another_is_busy(tmp_path):
    """Results are deposited in plan order, but a worker is not kept waiting for the one whose result is due:
    while the first chunk's worker is still busy, the other one goes through later chunks (the first call
    returns only after two others have), and the dose is the one-process dose."""
    ct = read_ct_phantom()
    spy = SpyEngine()
    one = compute_plan_dose(ct, _multi_chunk_plan(), spy, max_beamlets_per_call=4, workers=1)
    engine = _SlowFirstCall(tmp_path)
    engine.first_seeds = spy.seeds[: len(spy.calls[0][1])]  # the plan's first call
    two = compute_plan_dose(ct, _multi_chunk_plan(), engine, max_beamlets_per_call=4, workers=2)
    assert two.stats["engine_calls"] == one.stats["engine_calls"] >= 8
    np.testing.assert_array_equal(two.dose_gy, one.dose_gy)


@pytest.mark.parametrize("how", ["raise", "die"])
def test_a_worker_failure_reaches_the_plan(how):
    engine = _WorkerTrouble(how)
    match = "no 110 MeV beamlets here" if how == "raise" else "worker process .* died \\(exit code 3"
    with pytest.raises(InputError if how == "raise" else RuntimeError, match=match):
        compute_plan_dose(read_ct_phantom(), _multi_chunk_plan(), engine, max_beamlets_per_call=4, workers=2)


def test_beams_stream_through_the_workers_in_order_with_one_that_misses():
    """The engine calls of all beams go through one stream (the next beam is rotated while the workers finish
    the last): beam doses come back in plan order, a beam that misses the patient included, and the total
    is their sum, for one worker or two."""
    ct = read_ct_phantom()
    layer = [EnergyLayer(100, [[0, 0], [6, 0]], [1.0, 2.0])]
    plan = Plan([Beam("a", 0, 0, (0, 0, 0), layer), Beam("off", 90, 0, (0, 0, 300), layer),
                 Beam("c", 180, 0, (0, 0, 0), layer)], fractions=1)
    engine = get_engine("analytic")
    for workers in (1, 2):
        r = compute_plan_dose(ct, plan, engine, keep_beam_doses=True, workers=workers, max_beamlets_per_call=2)
        assert len(r.beam_dose_gy) == 3 and r.beam_dose_gy[1].max() == 0 < r.beam_dose_gy[0].max()
        assert r.stats["missed_spot_energies"] == 2
        for b, beam_dose in zip(plan.beams, r.beam_dose_gy):
            alone = compute_plan_dose(ct, Plan([b], fractions=1), engine, workers=1).dose_gy
            np.testing.assert_array_equal(np.maximum(beam_dose, 0), alone)
        np.testing.assert_allclose(r.dose_gy, np.maximum(sum(r.beam_dose_gy), 0), rtol=1e-6, atol=1e-9)


def test_workers_do_not_hang_after_torch_ran_on_several_threads(tmp_path):
    """torch's OpenMP runtime does not survive a fork once it ran on several threads: a worker that asked
    for two threads then hung (found in review). Workers run on one thread; a fresh interpreter that used
    four threads first gets its plan dose."""
    import subprocess
    import sys

    script = (
        "import numpy as np, torch\n"
        "torch.set_num_threads(4)\n"
        "x = torch.randn(256, 256); (x @ x).sum(); torch.nn.functional.conv2d(torch.randn(4, 8, 64, 64), "
        "torch.randn(8, 8, 3, 3)).sum()\n"
        "from dota.engines import get_engine\n"
        "from dota.plan.dose import compute_plan_dose\n"
        "from dota.plan.geometry import ct_from_array\n"
        "from dota.plan.model import Beam, EnergyLayer, Plan\n"
        "ct = ct_from_array(np.zeros((24, 40, 40), np.float32), (2.5, 3.0, 3.0), origin_mm=(-28.75, -58.5, -58.5))\n"
        "plan = Plan([Beam('a', 0, 0, (0, 0, 0), [EnergyLayer(e, [[0, 0], [6, 0], [0, 6]], [1.0, 1.0, 1.0]) "
        "for e in (80, 90, 100)])])\n"
        "r = compute_plan_dose(ct, plan, get_engine('analytic'), workers=2, max_beamlets_per_call=3)\n"
        "assert r.stats['workers'] == 2 and r.dose_gy.max() > 0\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_no_worker_process_outlives_its_plan():
    import multiprocessing

    compute_plan_dose(read_ct_phantom(), _multi_chunk_plan(), get_engine("analytic"), max_beamlets_per_call=4,
                      workers=2)
    for how in ("raise", "die"):
        with pytest.raises((InputError, RuntimeError)):
            compute_plan_dose(read_ct_phantom(), _multi_chunk_plan(), _WorkerTrouble(how), max_beamlets_per_call=4,
                              workers=2)
    assert multiprocessing.active_children() == []
