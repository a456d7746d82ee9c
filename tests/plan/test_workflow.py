"""End to end on a DICOM CT built here: `dota plan` makes a plan, `dota dose` recomputes it (analytic engine),
RTDOSE / MHD / NIfTI agree, DVHs and the plan page are written."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from dota.cli import main
from dota.plan.geometry import read_patient_ct
from dota.plan.planio import read_plan
from dota.plan.structures import sphere_mask
from dota.plan.workflow import read_plan_summary

from .helpers import one_torch_thread

TARGET = "sphere:-10,0,0,12"
OAR = "sphere:-10,26,0,6"


@pytest.fixture(scope="module")
def made_plan(tmp_path_factory, dicom_ct):
    out = tmp_path_factory.mktemp("plan")
    with one_torch_thread():
            code = main(["plan", "--ct", str(dicom_ct), "--target", TARGET, "--oar", OAR, "--angles", "0,90",
                     "--dose", "2", "--out", str(out / "plan.dcm"), "--out", str(out / "plan.json"),
                     "--dij", str(out / "dij.npz"), "--dose-out", str(out / "plan_dose.mhd"),
                     "--report", str(out / "report"), "--summary", str(out / "summary.json"), "--no-progress"])
    assert code == 0
    return out


@pytest.mark.slow
def test_plan_written_as_rt_ion_plan_reads_back_to_the_same_spots_and_weights(made_plan):
    dcm, js = read_plan(made_plan / "plan.dcm"), read_plan(made_plan / "plan.json")
    assert [b.gantry_deg for b in dcm.beams] == [0.0, 90.0]
    assert dcm.n_spots == js.n_spots > 20
    for a, b in zip(dcm.beams, js.beams):
        np.testing.assert_allclose(a.isocenter_mm, b.isocenter_mm, atol=1e-6)
        for la, lb in zip(a.layers, b.layers):
            assert la.energy_mev == pytest.approx(lb.energy_mev, abs=1e-6)
            np.testing.assert_allclose(la.positions_mm, lb.positions_mm, atol=1e-5)
            np.testing.assert_allclose(la.mu, lb.mu, rtol=1e-6)  # FL (float32) weights
    summary = json.loads((made_plan / "summary.json").read_text())
    assert summary["dij_nnz"] > 0 and summary["optimizer"]["iterations"] > 5
    assert 1.9 < summary["target_dose_gy"]["mean"] < 2.1
    # the plan page folder holds the same summary, with what dota report reads
    assert json.loads((made_plan / "report" / "run_summary.json").read_text()) == summary
    s = read_plan_summary(made_plan / "report" / "run_summary.json")
    assert s["engine"] == "analytic" and s["plan"] == f"{made_plan / 'plan.dcm'}, {made_plan / 'plan.json'}"
    assert [b["gantry_deg"] for b in s["beams"]] == [0.0, 90.0] and s["spot_energies"] == dcm.n_spots
    assert list(s["dvh"]) == ["sphere_12mm", "sphere_6mm"]  # the target first
    assert s["dvh"]["sphere_12mm"]["mean_gy"] == pytest.approx(summary["target_dose_gy"]["mean"], rel=0.01)
    assert str(made_plan / "report" / "run_summary.json") in s["written"] and "report" in s["timings_s"]


@pytest.mark.slow
def test_dose_recomputes_the_plan_and_outputs_agree(made_plan, dicom_ct, tmp_path, capsys):
    out = tmp_path
    code = main(["dose", "--ct", str(dicom_ct), "--plan", str(made_plan / "plan.dcm"), "--engine", "analytic",
                 "--out", str(out / "dose.dcm"), "--out", str(out / "dose.mhd"), "--out", str(out / "dose.nii.gz"),
                 "--structure", TARGET, "--structure", OAR, "--dvh", str(out / "dvh.csv"), "--prescription", "2",
                 "--reference", str(made_plan / "plan_dose.mhd"), "--report", str(out / "report"),
                 "--summary", str(out / "summary.json"), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "time per stage" in printed and "infer" in printed
    ct = read_patient_ct(dicom_ct)
    # RTDOSE read with pydicom alone
    ds = pydicom.dcmread(out / "dose.dcm")
    rtdose = ds.pixel_array.astype(np.float64) * float(ds.DoseGridScaling)
    mhd = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "dose.mhd"))).astype(np.float64)
    nii = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "dose.nii.gz"))).astype(np.float64)
    assert rtdose.shape == mhd.shape == ct.shape
    np.testing.assert_allclose(rtdose, mhd, atol=1e-6 * mhd.max())
    np.testing.assert_allclose(nii, mhd, atol=1e-6 * mhd.max())
    assert ds.FrameOfReferenceUID == ct.info["FrameOfReferenceUID"] and ds.PatientPosition == "HFS"
    assert ds.StudyInstanceUID == ct.info["StudyInstanceUID"] and ds.DoseUnits == "GY"
    np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], ct.origin_mm, atol=1e-6)
    np.testing.assert_allclose([float(v) for v in ds.GridFrameOffsetVector], 2.5 * np.arange(ct.shape[0]), atol=1e-6)
    np.testing.assert_allclose(sitk.ReadImage(str(out / "dose.mhd")).GetOrigin(), ct.origin_mm, atol=1e-6)
    # the plan covers its target
    target = sphere_mask(ct, (-10, 0, 0), 12)
    d = mhd[target]
    assert 1.9 < d.mean() < 2.1 and np.percentile(d, 5) > 1.75
    summary = json.loads((out / "summary.json").read_text())
    assert summary["gamma"]["pass_rate_percent"] == pytest.approx(100.0)  # same engine, same plan
    assert summary["gamma"]["pass_rate_in_patient_percent"] == pytest.approx(100.0)
    assert 0 < summary["gamma"]["voxels_in_patient"] <= summary["gamma"]["voxels"]
    assert read_plan_summary(out / "report" / "run_summary.json") == summary  # the page's folder says what it shows
    stats = (out / "dvh_stats.csv").read_text().splitlines()
    assert stats[0].startswith("structure,voxels,volume_cc,mean_gy") and len(stats) == 3
    assert (out / "dvh.csv").read_text().startswith("dose_gy,sphere_12mm_volume_percent,sphere_6mm_volume_percent")
    assert (out / "dvh.png").stat().st_size > 1000
    page = (out / "report" / "index.html").read_text()
    assert "type='range'" in page and "Gamma against the reference" in page and "Time per stage" in page
    assert "http://" not in page and "https://" not in page and "<script src" not in page
    for stage in ("read", "rotate", "infer", "deposit", "write"):
        assert stage in summary["timings_s"]


def test_dose_command_errors_are_one_line(dicom_ct, tmp_path, capsys):
    plan = tmp_path / "p.json"
    plan.write_text('{"format": "dota-plan", "version": 1, "beams": [{"gantry_deg": 0, "isocenter_mm": [0, 0, 0],'
                    ' "layers": [{"energy_mev": 100, "spots": [[0, 0, 1]]}]}]}')
    assert main(["dose", "--ct", str(tmp_path / "nope"), "--plan", str(plan), "--engine", "analytic",
                 "--out", str(tmp_path / "d.dcm")]) == 2
    assert "no CT at" in capsys.readouterr().err
    assert main(["dose", "--ct", str(dicom_ct), "--plan", str(plan), "--engine", "analytic",
                 "--out", str(tmp_path / "d.xyz")]) == 2
    err = capsys.readouterr().err.strip()
    assert "choose .dcm (RTDOSE)" in err and "\n" not in err
    assert main(["plan", "--ct", str(dicom_ct), "--target", "sphere:500,0,0,5", "--out", str(tmp_path / "p.dcm")]) == 2
    assert "holds no CT voxel" in capsys.readouterr().err


def test_dose_options_for_parallel_beams_and_no_block_corrections(made_plan, dicom_ct, tmp_path):
    runs = {}
    for name, extra in (("fan", []), ("parallel", ["--parallel-beams", "--no-block-corrections"])):
        out = tmp_path / name
        code = main(["dose", "--ct", str(dicom_ct), "--plan", str(made_plan / "plan.dcm"), "--engine", "analytic",
                     "--out", str(out / "dose.mhd"), "--summary", str(out / "s.json"), "--no-progress", *extra])
        assert code == 0
        runs[name] = (json.loads((out / "s.json").read_text()),
                      sitk.GetArrayFromImage(sitk.ReadImage(str(out / "dose.mhd"))).astype(np.float64))
    assert runs["fan"][0]["source_axis_mm"] == [1859.1, 2234.8] and runs["parallel"][0]["source_axis_mm"] is None
    assert runs["fan"][0]["halo"] is False and runs["fan"][0]["entrance_spot"] is False  # analytic: no MCsquare blocks
    fan, par = runs["fan"][1], runs["parallel"][1]
    assert fan.sum() == pytest.approx(par.sum(), rel=0.01) and np.abs(fan - par).max() > 1e-3 * fan.max()


def test_beamlet_only_options_are_refused_for_mcsquare_plan(made_plan, dicom_ct, tmp_path, capsys):
    code = main(["dose", "--ct", str(dicom_ct), "--plan", str(made_plan / "plan.dcm"), "--engine", "mcsquare-plan",
                 "--parallel-beams", "--out", str(tmp_path / "d.mhd"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "apply to beamlet engines" in err and "\n" not in err


@pytest.mark.slow
def test_several_references_are_averaged(made_plan, dicom_ct, tmp_path):
    from dota.plan.doseio import read_dose, write_dose

    dose, grid = read_dose(made_plan / "plan_dose.mhd")
    write_dose(tmp_path / "high.mhd", dose * 1.1, grid)  # two "runs" 10 % off each way: their mean is the dose
    write_dose(tmp_path / "low.mhd", dose * 0.9, grid)
    rates = {}
    for name, refs in (("one", ["high.mhd"]), ("two", ["high.mhd", "low.mhd"])):
        args = ["dose", "--ct", str(dicom_ct), "--plan", str(made_plan / "plan.dcm"), "--engine", "analytic",
                "--out", str(tmp_path / f"{name}.mhd"), "--summary", str(tmp_path / f"{name}.json"), "--no-progress"]
        for r in refs:
            args += ["--reference", str(tmp_path / r)]
        assert main(args) == 0
        gamma = json.loads((tmp_path / f"{name}.json").read_text())["gamma"]
        assert gamma["references"] == [str(tmp_path / r) for r in refs]
        rates[name] = gamma["pass_rate_percent"]
        # the runs' spread: their mean's noise and the pass rate an error-free dose would reach against it
        assert ("noise_ceiling_percent" in gamma) == (name == "two")
    assert rates["two"] == pytest.approx(100.0) and rates["one"] < 90.0
    assert 0 < gamma["reference_noise_percent"] <= 10.0 and gamma["noise_ceiling_percent"] < 90.0
    assert 0 <= gamma["noise_ceiling_in_patient_percent"] <= 100.0
