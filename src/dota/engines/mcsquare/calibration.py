"""CT calibrations for MCsquare: HU -> density and HU -> material tables (MCsquare's "scanner" folders).

``hu_calibration`` of :class:`~dota.engines.mcsquare.MCsquareEngine` is one of :data:`HU_CALIBRATIONS`:

- ``"dota"``: the stopping power of :func:`dota.physics.hu_to_rsp`, shared with the analytic engine, with
  the tissue materials of MCsquare's UCL_Toshiba calibration (:func:`build_dota_scanner`; built into the
  install folder at run time);
- ``"UCL_Toshiba"``: MCsquare's own Schneider-type calibration, as shipped;
- ``"water"``: every voxel water, density from HU (``resources/mcsquare/scanners/water``): a water tank.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from dota.engines.mcsquare.beam_model import beam_model_path
from dota.engines.mcsquare.install import MCsquareInstall
from dota.errors import DataFileError

#: CT calibrations the engine offers (module docstring).
HU_CALIBRATIONS: tuple[str, ...] = ("dota", "UCL_Toshiba", "water")
#: Energies (MeV) over which material-to-water stopping-power ratios are averaged.
_SPR_ENERGIES_MEV = np.linspace(70.0, 225.0, 32)


def _material_names(materials_dir: Path) -> dict[int, str]:
    names: dict[int, str] = {}
    for line in (materials_dir / "list.dat").read_text().splitlines():
        parts = line.split("#")[0].split()
        if len(parts) >= 2 and parts[0].isdigit():
            names[int(parts[0])] = parts[1]
    return names


def material_stopping_power_ratio(materials_dir: Path, label: int) -> float:
    """Mass stopping power of MCsquare material ``label`` relative to water, averaged over 70-225 MeV."""
    names = _material_names(materials_dir)
    if label not in names:
        raise DataFileError(f"MCsquare material {label} is not listed in {materials_dir / 'list.dat'}")

    def table(name: str) -> np.ndarray:
        return np.loadtxt(materials_dir / name / "G4_Stop_Pow.dat", ndmin=2)

    water, mat = table("Water"), table(names[label])
    ratio = np.interp(_SPR_ENERGIES_MEV, mat[:, 0], mat[:, 1]) / np.interp(_SPR_ENERGIES_MEV, water[:, 0], water[:, 1])
    return float(ratio.mean())


def read_material_bins(path: Path) -> list[tuple[float, int]]:
    """``(lowest HU, material label)`` rows of an MCsquare ``HU_Material_Conversion.txt``, sorted by HU."""
    bins = []
    for line in path.read_text().splitlines():
        parts = line.split("#")[0].split()
        if len(parts) >= 2:
            bins.append((float(parts[0]), int(parts[1])))
    if not bins:
        raise DataFileError(f"{path} has no HU -> material rows")
    return sorted(bins)


def build_dota_scanner(materials_dir: Path, material_bins: list[tuple[float, int]]) -> str:
    """HU -> density table that makes MCsquare's stopping power match :func:`dota.physics.hu_to_rsp`.

    Materials (elemental composition: nuclear interactions, scattering) stay those of ``material_bins``
    (each bin runs from its HU up to the next bin's); within a bin the density is RSP(HU) divided by the
    material's stopping-power ratio to water, so the analytic engine and MCsquare share one HU -> RSP
    calibration. Density nodes are placed at the calibration's nodes and on both sides of every bin edge.
    """
    from dota.physics import hu_to_rsp
    from dota.physics.hu import HU_CALIBRATION_TABLE

    lo, hi = -1000.0, 3000.0
    edges = [max(lo, b[0]) for b in material_bins] + [hi + 1.0]
    nodes = np.array([n[0] for n in HU_CALIBRATION_TABLE])
    rows: list[tuple[float, float]] = []
    for (start, label), end in zip(material_bins, edges[1:], strict=True):
        start = max(lo, start)
        if end <= start:
            continue
        spr = material_stopping_power_ratio(materials_dir, label)
        inside = nodes[(nodes > start) & (nodes < end - 1e-3)]
        for h in [start, *inside, min(end, hi + 1.0) - 1e-3]:
            rows.append((float(h), float(hu_to_rsp(np.array(h))) / spr))
    lines = ["# HU -> density (g/cm3) for MCsquare, made by dota so that MCsquare's stopping power",
             "# matches dota.physics.hu_to_rsp with the UCL_Toshiba materials; see dota.engines.mcsquare."]
    lines += [f"{h:.3f}\t{rho:.6f}" for h, rho in rows]
    return "\n".join(lines) + "\n"


def scanner_dir(install: MCsquareInstall, hu_calibration: str) -> Path:
    """Folder with ``HU_Density_Conversion.txt`` and ``HU_Material_Conversion.txt`` for a calibration
    (built on first use for ``"dota"``)."""
    if hu_calibration == "UCL_Toshiba":
        return install.scanner_dir
    if hu_calibration == "water":
        return beam_model_path().parent / "scanners" / "water"
    material_file = install.scanner_dir / "HU_Material_Conversion.txt"
    density = build_dota_scanner(install.materials_dir, read_material_bins(material_file))
    digest = hashlib.sha256(density.encode()).hexdigest()[:12]
    folder = install.root / "Scanners" / f"dota_{digest}"
    if not (folder / "HU_Density_Conversion.txt").is_file():
        # Several workers may get here at once: each builds its own copy and renames it into place.
        tmp = Path(tempfile.mkdtemp(prefix=".dota_scanner-", dir=folder.parent))
        (tmp / "HU_Density_Conversion.txt").write_text(density)
        shutil.copyfile(material_file, tmp / "HU_Material_Conversion.txt")
        try:
            os.replace(tmp, folder)
        except OSError:  # another worker won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def calibration_description(hu_calibration: str) -> str:
    """The ``hu_calibration`` attribute a dataset made with this calibration carries."""
    from dota.physics import HU_CALIBRATION_NAME

    return {
        "dota": f"{HU_CALIBRATION_NAME} (MCsquare materials: UCL_Toshiba)",
        "UCL_Toshiba": "MCsquare UCL_Toshiba",
        "water": "water (density from HU)",
    }[hu_calibration]
