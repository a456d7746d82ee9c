"""Reading and writing plans: DICOM RT Ion Plan, the JSON plan format of dota (``docs/plans.md``) and
MCsquare's PlanPencil text format.

DICOM RT Ion Plan
    Beams from ``IonBeamSequence`` (``TREATMENT`` beams, ``ScanMode`` MODULATED), gantry and couch
    angle and isocentre from the first control point, one energy layer per control point with
    non-zero ``ScanSpotMetersetWeights``; nominal energies inherited from earlier control points where
    absent. Spot MU = ``BeamMeterset`` (``FractionGroupSequence``) x weight /
    ``FinalCumulativeMetersetWeight``. The patient position comes from ``PatientSetupSequence``.
    Range shifters and other beam modifiers are refused (the engines do not model them).
PlanPencil
    The text plan MCsquare reads (see :func:`write_planpencil`). Its isocentres are in MCsquare's CT
    frame, so reading one needs the CT it was written for (:mod:`dota.plan.mcsquare_plan`).
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from dota.errors import DataFileError, InputError
from dota.fileio import atomic_write
from dota.plan.model import Beam, EnergyLayer, Plan, beam_model_energy_range_mev

JSON_FORMAT = "dota-plan"
JSON_VERSION = 1
RT_ION_PLAN_STORAGE = "1.2.840.10008.5.1.4.1.1.481.8"


def read_plan(path: str | os.PathLike, ct: Any = None, *, validate: bool = True) -> Plan:
    """Read a plan: ``.json`` (dota), ``.txt`` (MCsquare PlanPencil, needs ``ct``) or DICOM RT Ion Plan.

    With ``validate`` the plan is checked against the beam model's energy range (70-225 MeV) and for
    negative or non-finite weights; every problem is an :class:`InputError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"no plan at {path}")
    name = path.name.lower()
    if name.endswith(".json"):
        plan = read_json_plan(path)
    elif name.endswith(".txt"):
        if ct is None:
            raise InputError(f"{path}: a PlanPencil plan's isocentres are in MCsquare's CT frame; give the CT too")
        from dota.plan.mcsquare_plan import read_planpencil

        plan = read_planpencil(path, ct)
    else:
        plan = read_rtionplan(path)
    if validate:
        plan.validate(beam_model_energy_range_mev(), where=str(path))
    return plan


def write_plan(path: str | os.PathLike, plan: Plan, ct: Any = None) -> Path:
    """Write ``plan`` by suffix: ``.json``, ``.txt`` (PlanPencil, needs ``ct``) or anything else as RT Ion Plan;
    atomically (:func:`dota.fileio.atomic_write`), as every writer here."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".json"):
        return write_json_plan(path, plan)
    if name.endswith(".txt"):
        if ct is None:
            raise InputError("writing a PlanPencil plan needs the CT (its isocentres are in MCsquare's CT frame)")
        from dota.plan.mcsquare_plan import write_planpencil

        atomic_write(path, lambda t: write_planpencil(t, plan, ct))
        return path
    return write_rtionplan(path, plan, ct)


# --------------------------------------------------------------------------------------------------
# JSON


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """The JSON form of a plan (documented in ``docs/plans.md``)."""
    return {
        "format": JSON_FORMAT,
        "version": JSON_VERSION,
        "name": plan.name,
        "fractions": plan.fractions,
        "beams": [
            {
                "name": b.name,
                "gantry_deg": b.gantry_deg,
                "couch_deg": b.couch_deg,
                "isocenter_mm": list(b.isocenter_mm),
                "patient_position": b.patient_position,
                "layers": [
                    {"energy_mev": layer.energy_mev,
                     "spots": [[float(x), float(y), float(w)] for (x, y), w in zip(layer.positions_mm, layer.mu)]}
                    for layer in b.layers
                ],
            }
            for b in plan.beams
        ],
    }


def plan_from_dict(data: Any, where: str = "plan") -> Plan:
    """A plan from its JSON form; :class:`InputError` naming the first missing or wrong field."""

    def need(obj: Any, key: str, ctx: str) -> Any:
        if not isinstance(obj, dict) or key not in obj:
            raise InputError(f"{where}: {ctx} has no {key!r}")
        return obj[key]

    if not isinstance(data, dict) or data.get("format") != JSON_FORMAT:
        raise InputError(f"{where}: not a dota plan (expected \"format\": \"{JSON_FORMAT}\")")
    if int(data.get("version", 0)) != JSON_VERSION:
        raise InputError(f"{where}: plan format version {data.get('version')} is not {JSON_VERSION}")
    beams_in = need(data, "beams", "the plan")
    if not isinstance(beams_in, list):
        raise InputError(f"{where}: 'beams' must be a list")
    beams = []
    for bi, b in enumerate(beams_in):
        ctx = f"beam {bi + 1}"
        layers = []
        for li, layer in enumerate(need(b, "layers", ctx)):
            spots = np.asarray(need(layer, "spots", f"{ctx} layer {li + 1}"), dtype=np.float64)
            if spots.ndim != 2 or spots.shape[1] != 3:
                raise InputError(f"{where}: {ctx} layer {li + 1}: 'spots' must be a list of [X, Y, MU] triples")
            layers.append(EnergyLayer(float(need(layer, "energy_mev", f"{ctx} layer {li + 1}")), spots[:, :2],
                                      spots[:, 2]))
        try:
            beams.append(Beam(str(b.get("name", f"beam{bi + 1}")), float(need(b, "gantry_deg", ctx)),
                              float(b.get("couch_deg", 0.0)), tuple(need(b, "isocenter_mm", ctx)), layers,
                              str(b.get("patient_position", "HFS"))))
        except (TypeError, ValueError) as exc:
            if isinstance(exc, InputError):
                raise InputError(f"{where}: {exc}") from None
            raise InputError(f"{where}: {ctx}: {exc}") from None
    return Plan(beams, int(data.get("fractions", 1)), str(data.get("name", "plan")))


def read_json_plan(path: str | os.PathLike) -> Plan:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DataFileError(f"cannot read JSON plan {path}: {exc}") from None
    return plan_from_dict(data, where=str(path))


def write_json_plan(path: str | os.PathLike, plan: Plan) -> Path:
    path = Path(path)
    text = json.dumps(plan_to_dict(plan), indent=1) + "\n"
    atomic_write(path, lambda t: Path(t).write_text(text))
    return path


# --------------------------------------------------------------------------------------------------
# DICOM RT Ion Plan


def _get(ds: Any, key: str, where: str) -> Any:
    value = getattr(ds, key, None)
    if value is None or (isinstance(value, str) and value == ""):
        raise InputError(f"{where}: missing {key}")
    return value


def read_rtionplan(path: str | os.PathLike) -> Plan:
    """A DICOM RT Ion Plan (see the module docstring); :class:`InputError` on missing sequences or values."""
    import pydicom

    where = str(path)
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # pydicom raises many types for non-DICOM files
        raise DataFileError(f"cannot read {path} as DICOM (or a .json/.txt plan): {exc}") from None
    if "IonBeamSequence" not in ds:
        kind = "a photon RT Plan" if "BeamSequence" in ds else f"modality {getattr(ds, 'Modality', '?')}"
        raise InputError(f"{where}: no IonBeamSequence: not an RT Ion Plan ({kind})")
    if "FractionGroupSequence" not in ds or len(ds.FractionGroupSequence) == 0:
        raise InputError(f"{where}: missing FractionGroupSequence (the beams' monitor units)")
    fg = ds.FractionGroupSequence[0]
    fractions = int(getattr(fg, "NumberOfFractionsPlanned", 1) or 1)
    meterset: dict[int, float] = {}
    for ref in getattr(fg, "ReferencedBeamSequence", []):
        if getattr(ref, "BeamMeterset", None) is not None:
            meterset[int(ref.ReferencedBeamNumber)] = float(ref.BeamMeterset)
    setups = {int(s.PatientSetupNumber): str(getattr(s, "PatientPosition", "") or "HFS")
              for s in getattr(ds, "PatientSetupSequence", []) if "PatientSetupNumber" in s}
    beams = []
    for bi, ib in enumerate(ds.IonBeamSequence):
        number = int(getattr(ib, "BeamNumber", bi + 1))
        bname = str(getattr(ib, "BeamName", "") or f"beam{number}")
        bw = f"{where}: beam {bname!r}"
        if str(getattr(ib, "TreatmentDeliveryType", "TREATMENT")) != "TREATMENT":
            continue
        if str(getattr(ib, "ScanMode", "MODULATED")) not in ("MODULATED", "MODULATED_SPEC"):
            raise InputError(f"{bw}: ScanMode {ib.ScanMode} is not pencil-beam scanning (MODULATED)")
        if int(getattr(ib, "NumberOfRangeShifters", 0) or 0) > 0:
            raise InputError(f"{bw}: has a range shifter, which the dose engines do not model")
        if str(getattr(ib, "RadiationType", "PROTON")) != "PROTON":
            raise InputError(f"{bw}: radiation type {ib.RadiationType} is not PROTON")
        if "IonControlPointSequence" not in ib or len(ib.IonControlPointSequence) == 0:
            raise InputError(f"{bw}: missing IonControlPointSequence")
        if number not in meterset:
            raise InputError(f"{bw}: no BeamMeterset for beam number {number} in FractionGroupSequence")
        cps = ib.IonControlPointSequence
        cp0 = cps[0]
        gantry = float(_get(cp0, "GantryAngle", f"{bw}, control point 1"))
        couch = float(getattr(cp0, "PatientSupportAngle", 0.0) or 0.0)
        iso = [float(v) for v in _get(cp0, "IsocenterPosition", f"{bw}, control point 1")]
        final = float(getattr(ib, "FinalCumulativeMetersetWeight", 0.0) or 0.0)
        energy = None
        layers = []
        raw_total = 0.0
        for ci, cp in enumerate(cps):
            cw = f"{bw}, control point {ci + 1}"
            if getattr(cp, "NominalBeamEnergy", None) is not None:
                energy = float(cp.NominalBeamEnergy)
            if energy is None:
                raise InputError(f"{cw}: missing NominalBeamEnergy")
            if getattr(cp, "ScanSpotMetersetWeights", None) is None:
                continue
            weights = np.atleast_1d(np.asarray(cp.ScanSpotMetersetWeights, dtype=np.float64))
            if not np.any(weights > 0):
                continue
            positions = np.atleast_1d(np.asarray(_get(cp, "ScanSpotPositionMap", cw), dtype=np.float64))
            if positions.size != 2 * weights.size:
                raise InputError(f"{cw}: ScanSpotPositionMap has {positions.size} numbers for {weights.size} spots")
            n_declared = getattr(cp, "NumberOfScanSpotPositions", None)
            if n_declared is not None and int(n_declared) != weights.size:
                raise InputError(f"{cw}: NumberOfScanSpotPositions is {int(n_declared)} but {weights.size} weights")
            keep = weights > 0
            layers.append(EnergyLayer(energy, positions.reshape(-1, 2)[keep], weights[keep]))
            raw_total += float(weights.sum())
        if final <= 0:
            final = raw_total
        if final <= 0:
            raise InputError(f"{bw}: every spot weight is zero")
        scale = meterset[number] / final
        for layer in layers:
            layer.mu = layer.mu * scale
        setup = int(getattr(ib, "ReferencedPatientSetupNumber", 0) or 0)
        position = setups.get(setup, next(iter(setups.values()), "HFS"))
        try:
            beams.append(Beam(bname, gantry, couch, tuple(iso), layers, position))
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None
    if not beams:
        raise InputError(f"{where}: no TREATMENT beam in IonBeamSequence")
    info = {k: str(getattr(ds, k)) for k in ("SOPInstanceUID", "FrameOfReferenceUID", "PatientID", "PatientName",
                                             "StudyInstanceUID") if getattr(ds, k, None)}
    return Plan(beams, fractions, str(getattr(ds, "RTPlanLabel", "") or Path(path).stem), info)


def _ds(value: float) -> Any:
    from pydicom.valuerep import DSfloat

    return DSfloat(float(value), auto_format=True)


def new_dicom_instance(sop_class_uid: str, modality: str, ct: Any = None) -> Any:
    """A new DICOM object written by dota (RT Ion Plan, RTDOSE): file meta, SOP class and instance, modality,
    manufacturer, creation date and time, one new series, and the patient, study and frame of reference
    of ``ct`` (its ``info``; new identifiers where it has none)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    info = dict(getattr(ct, "info", {}) or {})
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    now = datetime.datetime.now()
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.Manufacturer = "dota"
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.PatientName = info.get("PatientName", "anonymous")
    ds.PatientID = info.get("PatientID", "dota")
    ds.StudyInstanceUID = info.get("StudyInstanceUID", generate_uid())
    ds.StudyID = info.get("StudyID", "1")
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1
    ds.FrameOfReferenceUID = info.get("FrameOfReferenceUID", generate_uid())
    return ds


def write_rtionplan(path: str | os.PathLike, plan: Plan, ct: Any = None, *, machine: str = "dota") -> Path:
    """Write ``plan`` as a DICOM RT Ion Plan (one file). Spot weights are written in MU
    (``FinalCumulativeMetersetWeight`` = ``BeamMeterset``), two control points per layer (weights, then
    zeros), as treatment-planning systems do. ``ct`` (a :class:`~dota.plan.geometry.PatientCT`) supplies
    the patient, study and frame-of-reference identifiers."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as Seq

    plan.validate(beam_model_energy_range_mev())
    ds = new_dicom_instance(RT_ION_PLAN_STORAGE, "RTPLAN", ct)
    ds.RTPlanDate, ds.RTPlanTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.RTPlanLabel = plan.name[:16]
    ds.RTPlanName = plan.name[:64]
    ds.RTPlanGeometry = "PATIENT"
    setups, seen = [], {}
    for b in plan.beams:
        if b.patient_position not in seen:
            seen[b.patient_position] = len(seen) + 1
            s = Dataset()
            s.PatientSetupNumber = seen[b.patient_position]
            s.PatientPosition = b.patient_position
            setups.append(s)
    ds.PatientSetupSequence = Seq(setups)
    fg = Dataset()
    fg.FractionGroupNumber = 1
    fg.NumberOfFractionsPlanned = plan.fractions
    fg.NumberOfBeams = len(plan.beams)
    fg.NumberOfBrachyApplicationSetups = 0
    refs, ion_beams = [], []
    for bi, b in enumerate(plan.beams):
        number = bi + 1
        layers = []
        for layer in b.layers:
            w32 = layer.mu.astype(np.float32)
            keep = w32 > 0
            layers.append((layer.energy_mev, layer.positions_mm[keep].astype(np.float32), w32[keep]))
        total = float(sum(float(w.astype(np.float64).sum()) for _, _, w in layers))
        ref = Dataset()
        ref.ReferencedBeamNumber = number
        ref.BeamMeterset = _ds(total)
        refs.append(ref)
        ib = Dataset()
        ib.BeamNumber = number
        ib.BeamName = b.name[:64]
        ib.BeamType = "STATIC"
        ib.RadiationType = "PROTON"
        ib.TreatmentDeliveryType = "TREATMENT"
        ib.ScanMode = "MODULATED"
        ib.TreatmentMachineName = machine
        ib.PrimaryDosimeterUnit = "MU"
        ib.ReferencedPatientSetupNumber = seen[b.patient_position]
        for key in ("NumberOfWedges", "NumberOfCompensators", "NumberOfBoli", "NumberOfBlocks",
                    "NumberOfRangeShifters", "NumberOfLateralSpreadingDevices", "NumberOfRangeModulators"):
            setattr(ib, key, 0)
        ib.FinalCumulativeMetersetWeight = _ds(total)
        cps, cumulative = [], 0.0
        for li, (energy, pos, w) in enumerate(layers):
            for half in (0, 1):
                cp = Dataset()
                cp.ControlPointIndex = 2 * li + half
                cp.NominalBeamEnergy = _ds(energy)
                cp.CumulativeMetersetWeight = _ds(cumulative)
                cp.ScanSpotTuneID = "dota"
                cp.NumberOfScanSpotPositions = int(len(w))
                cp.ScanSpotPositionMap = [float(v) for v in pos.reshape(-1)]
                cp.ScanSpotMetersetWeights = [float(v) for v in (w if half == 0 else np.zeros_like(w))]
                cp.NumberOfPaintings = 1
                if li == 0 and half == 0:
                    cp.GantryAngle = _ds(b.gantry_deg)
                    cp.GantryRotationDirection = "NONE"
                    cp.BeamLimitingDeviceAngle = _ds(0.0)
                    cp.BeamLimitingDeviceRotationDirection = "NONE"
                    cp.PatientSupportAngle = _ds(b.couch_deg)
                    cp.PatientSupportRotationDirection = "NONE"
                    cp.IsocenterPosition = [_ds(v) for v in b.isocenter_mm]
                if half == 0:
                    cumulative += float(w.astype(np.float64).sum())
                cps.append(cp)
        ib.NumberOfControlPoints = len(cps)
        ib.IonControlPointSequence = Seq(cps)
        ion_beams.append(ib)
    fg.ReferencedBeamSequence = Seq(refs)
    ds.FractionGroupSequence = Seq([fg])
    ds.IonBeamSequence = Seq(ion_beams)
    ds.ApprovalStatus = "UNAPPROVED"
    path = Path(path)
    atomic_write(path, lambda t: pydicom.dcmwrite(t, ds, enforce_file_format=True))
    return path

