"""`dota dose` and `dota plan` follow the one rule for output files (dota.fileio.check_output): every file
they will write is checked before anything is read or computed, an existing one is replaced only with
--overwrite, none may be an input, and each is written atomically."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import dota.plan.workflow as workflow
from dota.cli import main
from dota.errors import InputError
from dota.plan.doseio import write_by_name

from .helpers import small_plan

TARGET = "sphere:0,0,0,10"


@pytest.fixture
def plan_json(tmp_path) -> Path:
    from dota.plan.planio import write_json_plan

    return write_json_plan(tmp_path / "plan.json", small_plan())


@pytest.fixture
def no_work(monkeypatch):
    """Reading the CT fails the test: the outputs must be refused before any work."""
    def read(*args, **kwargs):
        raise AssertionError("the CT was read before the outputs were checked")

    monkeypatch.setattr(workflow, "read_patient_ct", read)


def _refused(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def _dose(dicom_ct, plan: Path, *extra: str) -> list[str]:
    return ["dose", "--ct", str(dicom_ct), "--plan", str(plan), "--engine", "analytic", "--no-progress", *extra]


def _plan(dicom_ct, *extra: str) -> list[str]:
    return ["plan", "--ct", str(dicom_ct), "--target", TARGET, "--no-progress", *extra]


def test_dose_refuses_every_existing_output_before_reading_anything(dicom_ct, plan_json, tmp_path, capsys, no_work):
    out = tmp_path / "out"
    out.mkdir()
    cases = [  # (existing file, options, the option the message names)
        ("dose.dcm", ["--out", str(out / "dose.dcm")], "--out"),
        ("dose.raw", ["--out", str(out / "dose.mhd")], "--out"),  # the MetaImage header's data file
        ("dose.nii.gz", ["--out", str(out / "dose.mha"), "--out", str(out / "dose.nii.gz")], "--out"),
        ("dvh_stats.csv", ["--structure", TARGET, "--dvh", str(out / "dvh.csv")], "--dvh"),
        ("dvh.png", ["--structure", TARGET, "--dvh", str(out / "dvh.csv")], "--dvh"),
        ("d.npz", ["--dij", str(out / "d")], "--dij"),  # numpy adds .npz
        ("s.json", ["--out", str(out / "x.mhd"), "--summary", str(out / "s.json")], "--summary"),
        ("b.h5", ["--blocks-out", str(out / "b.h5")], "--blocks-out"),
    ]
    for name, options, option in cases:
        (out / name).write_text("old")
        err = _refused(capsys, _dose(dicom_ct, plan_json, *options))
        assert f"error: {option} {out / name} exists: pass --overwrite to replace it, or choose another path" in err
        assert (out / name).read_text() == "old"
        (out / name).unlink()
    (out / "report").mkdir()
    (out / "report" / "run_summary.json").write_text("old")
    err = _refused(capsys, _dose(dicom_ct, plan_json, "--report", str(out / "report")))
    assert f"--report {out / 'report'} already holds run_summary.json: pass --overwrite" in err


def test_plan_refuses_every_existing_output_before_reading_anything(dicom_ct, tmp_path, capsys, no_work):
    for name, option in (("p.json", "--out"), ("d.npz", "--dij"), ("dose.nrrd", "--dose-out"), ("s.json", "--summary")):
        (tmp_path / name).write_text("old")
        options = ["--out", str(tmp_path / "p.dcm")] + (["--out", str(tmp_path / name)] if option == "--out" else
                                                         [option, str(tmp_path / name)])
        err = _refused(capsys, _plan(dicom_ct, *options))
        assert f"{option} {tmp_path / name} exists: pass --overwrite to replace it" in err
        (tmp_path / name).unlink()
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "index.html").write_text("old")
    err = _refused(capsys, _plan(dicom_ct, "--out", str(tmp_path / "p.dcm"), "--report", str(tmp_path / "r")))
    assert "already holds index.html: pass --overwrite" in err


def test_bad_outputs_are_refused_before_reading_anything(dicom_ct, plan_json, tmp_path, capsys, no_work):
    # an input, also with --overwrite
    err = _refused(capsys, _dose(dicom_ct, plan_json, "--out", str(tmp_path / "d.mhd"), "--summary", str(plan_json),
                                 "--overwrite"))
    assert f"--summary {plan_json} would overwrite the input {plan_json}" in err
    (tmp_path / "dir.mhd").mkdir()
    err = _refused(capsys, _plan(dicom_ct, "--out", str(tmp_path / "p.dcm"), "--dose-out", str(tmp_path / "dir.mhd"),
                                 "--overwrite"))
    assert f"--dose-out {tmp_path / 'dir.mhd'} is a directory: give a file name" in err
    # two outputs at one path (also a header's data file)
    err = _refused(capsys, _dose(dicom_ct, plan_json, "--out", str(tmp_path / "d.mhd"), "--out", str(tmp_path / "d.nhdr")))
    assert f"--out {tmp_path / 'd.raw'} is also written by --out" in err
    err = _refused(capsys, _plan(dicom_ct, "--out", str(tmp_path / "p.json"), "--summary", str(tmp_path / "p.json")))
    assert "is also written by --out" in err
    # a file where a folder should be
    (tmp_path / "file").write_text("x")
    err = _refused(capsys, _dose(dicom_ct, plan_json, "--out", str(tmp_path / "file" / "d.mhd")))
    assert f"--out {tmp_path / 'file' / 'd.mhd'}: {tmp_path / 'file'} is a file, not a folder" in err
    err = _refused(capsys, _dose(dicom_ct, plan_json, "--report", str(tmp_path / "file")))
    assert "is a file, not a folder: give a folder" in err and err.split("error: ")[1].startswith("--report")
    # what used to fail only after the dose was computed
    assert "choose .dcm (RTDOSE)" in _refused(capsys, _dose(dicom_ct, plan_json, "--out", str(tmp_path / "d.xyz")))
    assert "--dvh needs structures" in _refused(capsys, _dose(dicom_ct, plan_json, "--dvh", str(tmp_path / "v.csv")))
    assert not [p for p in tmp_path.iterdir() if p.name not in ("plan.json", "file", "dir.mhd")]


def test_dose_overwrite_replaces_and_missing_folders_are_made(dicom_ct, plan_json, tmp_path, capsys):
    out = tmp_path / "new" / "deeper"  # does not exist: made, as for the other commands
    argv = _dose(dicom_ct, plan_json, "--out", str(out / "dose.mhd"), "--out", str(out / "dose.dcm"),
                 "--structure", TARGET, "--dvh", str(out / "dvh.csv"), "--dij", str(out / "dij"),
                 "--report", str(out / "report"), "--summary", str(out / "s.json"))
    assert main(argv) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["dij.npz", "dose.dcm", "dose.mhd", "dose.raw", "dvh.csv", "dvh.png", "dvh_stats.csv", "report",
                     "s.json"]  # no temporary file or folder left
    assert sorted(p.name for p in (out / "report").iterdir()) == ["dvh.png", "index.html", "run_summary.json"]
    first = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "dose.mhd")))
    assert first.max() > 0
    summary = json.loads((out / "s.json").read_text())
    assert summary == json.loads((out / "report" / "run_summary.json").read_text())
    assert str(out / "dij.npz") in summary["written"]
    capsys.readouterr()
    err = _refused(capsys, argv)  # a second run: refused
    assert "exists: pass --overwrite" in err
    (out / "dvh.csv").write_text("old")
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "dvh.csv").read_text().startswith("dose_gy,")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "dose.mhd"))), first)
    assert sorted(p.name for p in out.iterdir()) == names


def test_plan_overwrite_replaces(dicom_ct, tmp_path, capsys, monkeypatch):
    plan = tmp_path / "plan.json"
    plan.write_text("old")
    argv = _plan(dicom_ct, "--out", str(plan), "--iterations", "5", "--spot-spacing", "8", "--dose-out",
                 str(tmp_path / "d.mhd"))
    assert "exists: pass --overwrite" in _refused(capsys, argv)
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads(plan.read_text())["format"] == "dota-plan"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.mhd", "d.raw", "plan.json"]


def test_write_by_name_leaves_nothing_on_error(tmp_path):
    def fail(scratch: Path) -> None:
        scratch.write_text("half")
        raise InputError("stop")

    (tmp_path / "d.mhd").write_text("old")
    with pytest.raises(InputError, match="stop"):
        write_by_name(tmp_path / "d.mhd", fail)
    assert [p.name for p in tmp_path.iterdir()] == ["d.mhd"] and (tmp_path / "d.mhd").read_text() == "old"


def test_blocks_out_writes_the_blocks_the_engine_got(dicom_ct, plan_json, tmp_path, capsys):
    from dota.data.hdf5 import BeamletFile
    from dota.data.splits import patient_of
    from dota.engines import get_engine
    from dota.plan.planio import read_plan

    assert main(_dose(dicom_ct, plan_json, "--out", str(tmp_path / "plain.mhd"))) == 0
    assert main(_dose(dicom_ct, plan_json, "--out", str(tmp_path / "d.mhd"), "--blocks-out", str(tmp_path / "b.h5"),
                      "--summary", str(tmp_path / "s.json"))) == 0
    plain, with_blocks = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / n))) for n in ("plain.mhd", "d.mhd"))
    np.testing.assert_array_equal(plain, with_blocks)  # recording changes nothing
    plan = read_plan(plan_json)
    energies = np.concatenate([b.spot_table()[1] for b in plan.beams])
    with BeamletFile(tmp_path / "b.h5") as f:
        geometry, dose, energy = np.asarray(f.geometry[:]), np.asarray(f.dose[:]), np.asarray(f.energy[:])
        meta, attrs = f.meta, f.attrs
    assert json.loads((tmp_path / "s.json").read_text())["blocks_out"] == str(tmp_path / "b.h5")
    assert len(energy) == plan.n_spots == 6 and geometry.dtype == np.int16 and geometry.shape[1:] == (150, 24, 24)
    np.testing.assert_array_equal(np.sort(meta["plan_column"]), np.arange(6))  # every spot-energy once
    np.testing.assert_allclose(energy, energies[meta["plan_column"]], rtol=1e-6)
    assert list(meta["gantry_deg"][meta["plan_column"]]) == [0, 0, 0, 0, 0, 90]
    assert all(patient_of(str(s)) == patient_of(f"ct:{Path(dicom_ct).name}") for s in meta["source"])
    assert attrs["engine"] == "analytic" and (geometry > -1000).any()  # blocks hold the phantom, not only air
    # the stored dose is the engine's beamlet of the stored block (recomputed from the int16 HU: rounding only)
    again = get_engine("analytic").dose(geometry.astype(np.float32), energy)
    assert np.abs(again - dose).max() <= 1e-3 * dose.max() and dose.max() > 0
    err = _refused(capsys, ["dose", "--ct", str(dicom_ct), "--plan", str(plan_json), "--engine", "mcsquare-plan",
                            "--blocks-out", str(tmp_path / "c.h5"), "--no-progress"])
    assert "--blocks-out needs a beamlet engine" in err and not (tmp_path / "c.h5").exists()


def test_the_stored_engine_replays_a_blocks_out_file_and_refuses_another_plans(dicom_ct, plan_json, tmp_path, capsys):
    """--engine stored --blocks-in gives the dose of the run that wrote the file, bit for bit, with the engine's
    record (name, MCsquare blocks or not) taken from the file; a plan whose blocks or energies differ, a file too
    short for the plan, and --blocks-in without the stored engine are refused in one line."""
    from dataclasses import replace

    from dota.engines.stored import StoredBeamletEngine
    from dota.plan.planio import write_json_plan

    assert main(_dose(dicom_ct, plan_json, "--out", str(tmp_path / "d.mhd"), "--blocks-out", str(tmp_path / "b.h5"))) == 0
    replay = ["dose", "--ct", str(dicom_ct), "--plan", str(plan_json), "--engine", "stored", "--blocks-in",
              str(tmp_path / "b.h5"), "--no-progress", "--summary", str(tmp_path / "s.json")]
    assert main([*replay, "--out", str(tmp_path / "r.mhd")]) == 0
    first, again = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / n))) for n in ("d.mhd", "r.mhd"))
    np.testing.assert_array_equal(first, again)
    assert json.loads((tmp_path / "s.json").read_text())["engine"] == "stored"
    engine = StoredBeamletEngine(tmp_path / "b.h5")
    assert engine.source_engine == "analytic" and not engine.mcsquare_blocks and not engine.concurrent
    capsys.readouterr()

    plan = small_plan()
    other = replace(plan, beams=[replace(plan.beams[0], layers=[replace(plan.beams[0].layers[0], energy_mev=101.0),
                                                               *plan.beams[0].layers[1:]]), *plan.beams[1:]])
    err = _refused(capsys, [*replay, "--plan", str(write_json_plan(tmp_path / "other.json", other)), "--out",
                            str(tmp_path / "o.mhd"), "--overwrite"])
    assert "is not the one this plan asks for" in err and not (tmp_path / "o.mhd").exists()
    more = replace(plan, beams=[*plan.beams, replace(plan.beams[1], name="B3")])
    err = _refused(capsys, [*replay, "--plan", str(write_json_plan(tmp_path / "more.json", more)), "--out",
                            str(tmp_path / "m.mhd"), "--overwrite"])
    assert "holds 6 beamlets" in err
    err = _refused(capsys, [*_dose(dicom_ct, plan_json, "--out", str(tmp_path / "x.mhd")), "--blocks-in",
                            str(tmp_path / "b.h5")])
    assert "--engine stored" in err
    err = _refused(capsys, [*replay[:8], str(tmp_path / "missing.h5"), "--no-progress", "--out", str(tmp_path / "y.mhd")])
    assert "missing.h5" in err
