"""Plan files: RT Ion Plan, JSON and PlanPencil round trips; parsing errors with clear one-line messages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dota.errors import DataFileError, InputError
from dota.plan.geometry import read_patient_ct
from dota.plan.planio import read_plan, write_plan

from .helpers import small_plan


def _same_plan(a, b, rtol=1e-6):
    assert len(a.beams) == len(b.beams) and a.fractions == b.fractions
    for ba, bb in zip(a.beams, b.beams):
        assert (ba.gantry_deg, ba.couch_deg, ba.patient_position) == (bb.gantry_deg, bb.couch_deg, bb.patient_position)
        np.testing.assert_allclose(ba.isocenter_mm, bb.isocenter_mm, atol=1e-4)
        assert [la.energy_mev for la in ba.layers] == pytest.approx([la.energy_mev for la in bb.layers], abs=1e-4)
        for la, lb in zip(ba.layers, bb.layers):
            np.testing.assert_allclose(la.positions_mm, lb.positions_mm, atol=1e-4)
            np.testing.assert_allclose(la.mu, lb.mu, rtol=rtol)


@pytest.mark.parametrize("suffix", [".dcm", ".json"])
def test_round_trip(tmp_path, suffix):
    plan = small_plan((3.5, -2.25, 10.0))
    path = write_plan(tmp_path / f"plan{suffix}", plan)
    back = read_plan(path)
    _same_plan(plan, back, rtol=1e-6)
    assert back.total_mu == pytest.approx(plan.total_mu, rel=1e-6)


def test_rtionplan_content(tmp_path):
    path = write_plan(tmp_path / "plan.dcm", small_plan())
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.8" and ds.Modality == "RTPLAN"
    beam = ds.IonBeamSequence[0]
    assert beam.ScanMode == "MODULATED" and beam.RadiationType == "PROTON"
    cps = beam.IonControlPointSequence
    assert len(cps) == 4  # two control points per layer
    assert float(cps[0].GantryAngle) == 0.0 and float(ds.IonBeamSequence[1].IonControlPointSequence[0].PatientSupportAngle) == 10.0
    assert list(cps[1].ScanSpotMetersetWeights) == [0.0, 0.0, 0.0]
    assert float(cps[2].CumulativeMetersetWeight) == pytest.approx(0.875)
    assert int(ds.FractionGroupSequence[0].NumberOfFractionsPlanned) == 3


def test_rtionplan_mu_from_beam_meterset(tmp_path):
    """Weights are relative: spot MU = BeamMeterset * weight / FinalCumulativeMetersetWeight."""
    path = write_plan(tmp_path / "plan.dcm", small_plan())
    ds = pydicom.dcmread(path)
    for ib in ds.IonBeamSequence:  # rescale the stored weights by 10: the MU must not change
        ib.FinalCumulativeMetersetWeight = float(ib.FinalCumulativeMetersetWeight) * 10
        for cp in ib.IonControlPointSequence:
            cp.ScanSpotMetersetWeights = [10 * float(w) for w in np.atleast_1d(cp.ScanSpotMetersetWeights)]
    ds.FractionGroupSequence[0].ReferencedBeamSequence[0].BeamMeterset = 2 * 2.625  # beam 1's MU doubled
    ds.save_as(tmp_path / "scaled.dcm")
    back = read_plan(tmp_path / "scaled.dcm")
    np.testing.assert_allclose(back.beams[0].layers[0].mu, [1.0, 0.5, 0.25], rtol=1e-6)
    np.testing.assert_allclose(back.beams[1].layers[0].mu, [2.0], rtol=1e-6)


def _broken(tmp_path: Path, edit) -> Path:
    path = write_plan(tmp_path / "plan.dcm", small_plan())
    ds = pydicom.dcmread(path)
    edit(ds)
    out = tmp_path / "broken.dcm"
    ds.save_as(out)
    return out


@pytest.mark.parametrize("edit, message", [
    (lambda ds: delattr(ds, "IonBeamSequence"), "no IonBeamSequence: not an RT Ion Plan"),
    (lambda ds: delattr(ds, "FractionGroupSequence"), "missing FractionGroupSequence"),
    (lambda ds: delattr(ds.IonBeamSequence[0], "IonControlPointSequence"), "beam 'B1': missing IonControlPointSequence"),
    (lambda ds: delattr(ds.IonBeamSequence[0].IonControlPointSequence[0], "IsocenterPosition"),
     "control point 1: missing IsocenterPosition"),
    (lambda ds: delattr(ds.IonBeamSequence[0].IonControlPointSequence[0], "GantryAngle"), "missing GantryAngle"),
    (lambda ds: setattr(ds.IonBeamSequence[0].IonControlPointSequence[0], "NominalBeamEnergy", 65.0),
     "layer 1: energy 65 MeV is outside the beam model's range 70-225 MeV"),
    (lambda ds: setattr(ds.IonBeamSequence[1].IonControlPointSequence[0], "NominalBeamEnergy", 230.0),
     "beam 'B2', layer 1: energy 230 MeV is outside"),
    (lambda ds: setattr(ds.IonBeamSequence[0], "NumberOfRangeShifters", 1), "range shifter"),
    (lambda ds: setattr(ds.IonBeamSequence[0].IonControlPointSequence[0], "ScanSpotPositionMap", [0.0, 0.0]),
     "ScanSpotPositionMap has 2 numbers for 3 spots"),
])
def test_rtionplan_errors(tmp_path, edit, message):
    path = _broken(tmp_path, edit)
    with pytest.raises(InputError) as err:
        read_plan(path)
    text = str(err.value)
    assert message in text and "\n" not in text and str(path) in text


def test_not_dicom_and_missing(tmp_path):
    bad = tmp_path / "plan.dcm"
    bad.write_text("not dicom")
    with pytest.raises(DataFileError, match="cannot read"):
        read_plan(bad)
    with pytest.raises(DataFileError, match="no plan at"):
        read_plan(tmp_path / "absent.dcm")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("beams"), "the plan has no 'beams'"),
    (lambda d: d["beams"][0].pop("isocenter_mm"), "beam 1 has no 'isocenter_mm'"),
    (lambda d: d["beams"][0]["layers"][0].__setitem__("spots", [[1, 2]]), "[X, Y, MU] triples"),
    (lambda d: d["beams"][1]["layers"][0].__setitem__("energy_mev", 300), "300 MeV is outside"),
    (lambda d: d.__setitem__("format", "other"), "not a dota plan"),
])
def test_json_errors(tmp_path, edit, message):
    data = json.loads(write_plan(tmp_path / "p.json", small_plan()).read_text())
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=None) as err:
        read_plan(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_planpencil_round_trip(tmp_path, dicom_ct):
    ct = read_patient_ct(dicom_ct)
    plan = small_plan((3.0, -1.5, 4.0))
    path = write_plan(tmp_path / "plan.txt", plan, ct)
    text = path.read_text()
    assert "#TREATMENT-PLAN-DESCRIPTION" in text and text.count("#FIELD-DESCRIPTION") == 2
    # MCsquare reads a "###FieldsID" tag before each field's ID ("FieldsID list is interrupted" otherwise)
    lines = text.splitlines()
    tags = [i for i, ln in enumerate(lines) if ln == "###FieldsID"]
    assert [lines[i + 1] for i in tags] == ["1", "2"]
    back = read_plan(path, ct)
    _same_plan(plan, back, rtol=1e-6)
    with pytest.raises(InputError, match="give the CT too"):
        read_plan(path)


def test_cli_refuses_a_bad_plan_in_one_line(tmp_path, dicom_ct, capsys):
    from dota.cli import main

    path = _broken(tmp_path, lambda ds: setattr(ds.IonBeamSequence[0].IonControlPointSequence[2], "NominalBeamEnergy", 50.0))
    code = main(["dose", "--ct", str(dicom_ct), "--plan", str(path), "--engine", "analytic",
                 "--out", str(tmp_path / "d.dcm"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "layer 2: energy 50 MeV is outside the beam model's range 70-225 MeV" in err
