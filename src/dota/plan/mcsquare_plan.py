"""MCsquare's own full-plan simulation on the whole CT, and its PlanPencil plan format.

MCsquare's frame: the CT is written as a MetaImage with the columns (DICOM x) and rows (DICOM y)
reversed, and MCsquare reads it with its corner at the origin and its x axis reversed once more
(``x_simu = -x_ct + Lx`` in MCsquare's ``compute_geometry.c``; the MetaImage ``Offset`` is not used). So
a DICOM point ``(x, y, z)`` (mm) is ``(x - x0 + sx/2, ny*sy - (y - y0 + sy/2), z - z0 + sz/2)`` in
MCsquare, with ``(x0, y0, z0)`` the centre of the first voxel: only y is reversed, and MCsquare's
``(x, y, z)`` are IEC X, Z, Y of a head-first-supine patient (its beam model's "XYZ to XZY"), as
OpenTPS converts isocentres. This was checked by simulation (``tests/plan/test_mcsquare_plan.py``):
with it, MCsquare's beams at gantry 0, 90 and 270 enter from the sides IEC 61217 gives for a
head-first-supine patient, a couch angle of 90 degrees turns them as IEC does, and spot positions
``(X, Y)`` land where :func:`dota.plan.geometry.iec_beam_axes` puts them, also for an isocentre far from
the CT's centre (where reversing x as well would mirror the beam about the centre). Only axis-aligned
CTs (identity direction) and head-first-supine plans are supported, because MCsquare's plan has no
patient position. Gantry and couch angles and spot positions ``(X, Y)`` are passed unchanged (IEC, as
in DICOM). Spot weights are MU; MCsquare samples spots by protons (the beam model's ``ProtonsMU``) and
writes dose per simulated proton (eV/g), which :func:`mcsquare_plan_dose` turns into Gy for the plan's
protons, times the number of fractions.

The CT calibration is the project's (``hu_calibration="dota"``, see :class:`dota.engines.mcsquare.MCsquareEngine`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dota.constants import MCSQUARE_DEFAULT_PRIMARIES
from dota.errors import DataFileError, InputError
from dota.plan.geometry import PatientCT
from dota.plan.model import Beam, EnergyLayer, Plan, protons_per_mu


def _check_frame(ct: PatientCT) -> None:
    if not np.allclose(ct.direction, np.eye(3), atol=1e-6):
        raise InputError("MCsquare plans need an axis-aligned CT (identity direction); this CT is rotated or flipped")


def dicom_to_mcsquare(ct: PatientCT, xyz: np.ndarray) -> np.ndarray:
    """DICOM patient points (..., 3) mm to MCsquare's CT frame (module docstring)."""
    _check_frame(ct)
    sz, sy, sx = ct.spacing_mm
    ny = ct.shape[1]
    p = np.asarray(xyz, dtype=np.float64) - np.asarray(ct.origin_mm) + 0.5 * np.array([sx, sy, sz])
    p[..., 1] = ny * sy - p[..., 1]
    return p


def mcsquare_to_dicom(ct: PatientCT, p: np.ndarray) -> np.ndarray:
    """Inverse of :func:`dicom_to_mcsquare`."""
    _check_frame(ct)
    sz, sy, sx = ct.spacing_mm
    ny = ct.shape[1]
    q = np.array(p, dtype=np.float64)
    q[..., 1] = ny * sy - q[..., 1]
    return q + np.asarray(ct.origin_mm) - 0.5 * np.array([sx, sy, sz])


def format_planpencil(plan: Plan, ct: PatientCT) -> str:
    """The PlanPencil text of ``plan`` for MCsquare on ``ct`` (one field per beam, one control point per layer)."""
    for b in plan.beams:
        if b.patient_position != "HFS":
            raise InputError(f"beam {b.name!r}: MCsquare plans are head-first supine only, not {b.patient_position}")
    total = plan.total_mu
    lines = ["#TREATMENT-PLAN-DESCRIPTION", "#PlanName", plan.name.replace(" ", "_") or "plan",
             "#NumberOfFractions", str(plan.fractions), "##FractionID", "1", "##NumberOfFields", str(len(plan.beams)),
             # MCsquare reads one "###FieldsID" tag before each field's ID (data_beam_model.c)
             *[v for i in range(len(plan.beams)) for v in ("###FieldsID", str(i + 1))],
             "#TotalMetersetWeightOfAllFields", f"{total:.6f}", ""]
    for i, b in enumerate(plan.beams):
        iso = dicom_to_mcsquare(ct, np.asarray(b.isocenter_mm))
        lines += ["#FIELD-DESCRIPTION", "###FieldID", str(i + 1), "###FinalCumulativeMeterSetWeight",
                  f"{b.total_mu:.6f}", "###GantryAngle", f"{b.gantry_deg:.4f}", "###PatientSupportAngle",
                  f"{b.couch_deg:.4f}", "###IsocenterPosition", f"{iso[0]:.4f}\t{iso[1]:.4f}\t{iso[2]:.4f}",
                  "###NumberOfControlPoints", str(len(b.layers)), "", "#SPOTS-DESCRIPTION"]
        cumulative = 0.0
        for j, layer in enumerate(b.layers):
            cumulative += float(layer.mu.sum())
            lines += ["####ControlPointIndex", str(j + 1), "####SpotTunnedID", "1", "####CumulativeMetersetWeight",
                      f"{cumulative:.6f}", "####Energy (MeV)", f"{layer.energy_mev:.4f}", "####NbOfScannedSpots",
                      str(layer.n_spots), "####X Y Weight"]
            lines += [f"{x:.4f} {y:.4f} {w:.8g}" for (x, y), w in zip(layer.positions_mm, layer.mu)]
        lines.append("")
    return "\n".join(lines) + "\n"


def write_planpencil(path: str | os.PathLike, plan: Plan, ct: PatientCT) -> Path:
    path = Path(path)
    path.write_text(format_planpencil(plan, ct))
    return path


def read_planpencil(path: str | os.PathLike, ct: PatientCT) -> Plan:
    """A PlanPencil plan (isocentres converted from MCsquare's frame on ``ct`` to DICOM)."""
    where = str(path)
    try:
        lines = [ln.strip() for ln in Path(path).read_text().replace("\r\n", "\n").split("\n")]
    except OSError as exc:
        raise DataFileError(f"cannot read PlanPencil plan {path}: {exc}") from None
    pos = 0

    def value_after(tag: str) -> str:
        nonlocal pos
        while pos < len(lines) and lines[pos] != tag:
            pos += 1
        if pos + 1 >= len(lines):
            raise InputError(f"{where}: missing {tag}")
        pos += 2
        return lines[pos - 1]

    def has_next(tag: str, before: str | None = None) -> bool:
        for ln in lines[pos:]:
            if ln == tag:
                return True
            if before is not None and ln == before:
                return False
        return False

    if "#TREATMENT-PLAN-DESCRIPTION" not in lines:
        raise InputError(f"{where}: not an MCsquare PlanPencil plan (no #TREATMENT-PLAN-DESCRIPTION)")
    try:
        name = value_after("#PlanName")
        fractions = int(float(value_after("#NumberOfFractions")))
        beams = []
        while has_next("#FIELD-DESCRIPTION"):
            fid = value_after("###FieldID")
            gantry = float(value_after("###GantryAngle"))
            couch = float(value_after("###PatientSupportAngle"))
            iso_mc = np.array([float(v) for v in value_after("###IsocenterPosition").split()])
            n_cp = int(value_after("###NumberOfControlPoints"))
            layers = []
            for _ in range(n_cp):
                energy = float(value_after("####Energy (MeV)"))
                n = int(value_after("####NbOfScannedSpots"))
                value_after("####X Y Weight")
                pos -= 1
                rows = np.array([[float(v) for v in lines[pos + k].split()[:3]] for k in range(n)]).reshape(-1, 3)
                pos += n
                layers.append(EnergyLayer(energy, rows[:, :2], rows[:, 2]))
            iso = tuple(float(v) for v in mcsquare_to_dicom(ct, iso_mc))
            beams.append(Beam(f"field{fid}", gantry, couch, iso, layers, "HFS"))
    except (ValueError, IndexError) as exc:
        raise InputError(f"{where}: malformed PlanPencil plan near line {pos + 1}: {exc}") from None
    if not beams:
        raise InputError(f"{where}: no #FIELD-DESCRIPTION")
    return Plan(beams, fractions, name)


def mcsquare_plan_dose(ct: PatientCT, plan: Plan, *, primaries: int = MCSQUARE_DEFAULT_PRIMARIES * 10,
                       threads: int = 1, seed: int = 1, hu_calibration: str = "dota",
                       timeout_s: float = 6 * 3600.0, work_dir: str | os.PathLike | None = None) -> np.ndarray:
    """Dose (Gy, all fractions; (z, y, x) on ``ct``'s grid) of MCsquare's own simulation of the whole plan
    with ``primaries`` protons in all (:meth:`dota.engines.mcsquare.MCsquareEngine.simulate`). ``work_dir``
    keeps MCsquare's inputs and outputs when given."""
    from dota.engines.mcsquare import EV_PER_G_TO_GY, MCsquareEngine

    plan.validate()
    _check_frame(ct)
    engine = MCsquareEngine(primaries=primaries, threads=threads, seed=seed, hu_calibration=hu_calibration,
                            timeout_s=timeout_s)
    sz, sy, sx = ct.spacing_mm
    dose_mc = engine.simulate(ct.hu[:, ::-1, ::-1], (sx, sy, sz), format_planpencil(plan, ct), int(seed),
                              folder=work_dir, job="the plan")
    protons = sum(float(np.sum(layer.mu * protons_per_mu(layer.energy_mev))) for b in plan.beams for layer in b.layers)
    return (dose_mc[:, ::-1, ::-1] * (EV_PER_G_TO_GY * protons * plan.fractions)).astype(np.float32)
