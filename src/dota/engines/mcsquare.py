"""Monte Carlo ground truth with MCsquare (UCLouvain / IBA, Apache-2.0), driven as a binary.

MCsquare's static Linux builds, its material data and the ``UCL_Toshiba`` scanner calibration ship
inside the PyPI wheel ``opentps-core==2.0.0`` (Apache-2.0, OpenTPS consortium). :func:`install_mcsquare`
downloads that wheel with pip, extracts only what MCsquare needs into a cache folder and fixes it
(launcher line endings, run bits). opentps itself is never imported (it pins ``numpy<2``).

Each beamlet is one MCsquare run: the beam's-eye-view block is written as a CT (MHD), with a
one-spot plan at the centre of the entrance face and the extended beam model of
``dota/resources/mcsquare`` (70-225 MeV). The dose (to water) is read back and converted to
Gy per 1e9 primaries.

Set-up::

    python -m dota.engines.mcsquare --install      # or: dota mcsquare install
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from dota.constants import (
    ENGINE_ENERGY_RANGE_MEV,
    HU_CLIP,
    MCSQUARE_DEFAULT_PRIMARIES,
    MCSQUARE_WHEEL,
    PRIMARIES_UNIT,
    VOXEL_MM,
)
from dota.engines.base import DoseEngine, register_engine
from dota.errors import DataFileError, EngineUnavailableError, InputError
from dota.validation import check_beamlets

#: Folder of the MCsquare files inside the wheel.
_WHEEL_MCSQUARE_DIR = "opentps/core/processing/doseCalculation/protons/MCsquare/"
#: Linux builds, best first, with the /proc/cpuinfo flag each one needs (None: runs anywhere on x86-64).
_BUILDS: tuple[tuple[str, str | None], ...] = (
    ("MCsquare_linux_avx512", "avx512f"),
    ("MCsquare_linux_avx2", "avx2"),
    ("MCsquare_linux_avx", "avx"),
    ("MCsquare_linux_sse4", "sse4_2"),
    ("MCsquare_linux", None),
)
_LAUNCHERS = ("MCsquare",)
_MARKER = "dota-install.txt"
_INSTALL_HINT = ("run `dota mcsquare install` (or `python -m dota.engines.mcsquare --install`; "
                 "scripts/setup.sh does it)")

#: The beam model and scanner calibration this package ships and uses (see resources/mcsquare/README.md).
BEAM_MODEL_FILE = "BDL_dota_IBA_DN_70_225.txt"
SCANNER = "UCL_Toshiba"


def default_cache_dir() -> Path:
    """``$DOTA_MCSQUARE_DIR``, else ``$DOTA_CACHE/mcsquare``, else ``~/.cache/dota/mcsquare``."""
    if os.environ.get("DOTA_MCSQUARE_DIR"):
        return Path(os.environ["DOTA_MCSQUARE_DIR"]).expanduser()
    if os.environ.get("DOTA_CACHE"):
        return Path(os.environ["DOTA_CACHE"]).expanduser() / "mcsquare"
    return Path.home() / ".cache" / "dota" / "mcsquare"


def _wanted_member(name: str) -> str | None:
    """Path relative to the install folder of a wheel member we keep, or None."""
    if name == "opentps_core-2.0.0.dist-info/LICENSE":
        return "LICENSE-opentps-core.txt"
    if not name.startswith(_WHEEL_MCSQUARE_DIR) or name.endswith("/"):
        return None
    rel = name[len(_WHEEL_MCSQUARE_DIR) :]
    top = rel.split("/", 1)[0]
    if top in ("Materials", "Scanners", "BDL") and not rel.endswith(".py"):
        return rel
    if top in {b for b, _ in _BUILDS} or top in _LAUNCHERS:
        return rel
    return None


def install_mcsquare(cache_dir: str | os.PathLike | None = None, *, wheel: str | os.PathLike | None = None,
                     force: bool = False) -> Path:
    """Install MCsquare into ``cache_dir`` (default :func:`default_cache_dir`) and return that folder.

    Downloads ``opentps-core==2.0.0`` with ``pip download --no-deps`` unless ``wheel`` names a local
    copy, keeps the Linux builds, ``Materials/``, ``Scanners/`` and ``BDL/`` (about 75 MB), converts the
    launchers' CRLF line endings and sets run bits. The install is atomic and idempotent.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if (root / _MARKER).is_file() and not force:
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".mcsquare-", dir=root.parent) as tmp:
        tmp_path = Path(tmp)
        if wheel is None:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--ignore-requires-python", "--disable-pip-version-check", "-q", MCSQUARE_WHEEL,
                   "-d", str(tmp_path / "wheel")]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            found = sorted((tmp_path / "wheel").glob("opentps_core-*.whl"))
            if proc.returncode != 0 or not found:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel"]
                raise EngineUnavailableError(f"could not download {MCSQUARE_WHEEL} with pip: {tail[0]}")
            wheel = found[0]
        stage = tmp_path / "mcsquare"
        try:
            with zipfile.ZipFile(wheel) as zf:
                for info in zf.infolist():
                    rel = _wanted_member(info.filename)
                    if rel is None:
                        continue
                    dest = stage / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(dest, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        except (zipfile.BadZipFile, OSError) as exc:
            raise EngineUnavailableError(f"cannot unpack the MCsquare wheel {wheel}: {exc}") from None
        missing = [b for b, _ in _BUILDS if not (stage / b).is_file()]
        if missing or not (stage / "Materials" / "list.dat").is_file():
            raise EngineUnavailableError(f"{wheel} does not contain the MCsquare Linux builds and materials")
        for name in _LAUNCHERS:
            launcher = stage / name
            if launcher.is_file():
                launcher.write_bytes(launcher.read_bytes().replace(b"\r\n", b"\n"))
        for name in [b for b, _ in _BUILDS] + list(_LAUNCHERS):
            path = stage / name
            if path.is_file():
                path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        (stage / _MARKER).write_text(
            f"MCsquare from {MCSQUARE_WHEEL} (Apache-2.0, OpenTPS consortium: UCLouvain and IBA)\n"
            f"installed by dota for {sys.platform}\n"
        )
        old = tmp_path / "old"
        if root.exists():
            os.replace(root, old)
        os.replace(stage, root)
    return root


def select_build(cpuinfo: str | None = None) -> str:
    """Name of the fastest MCsquare build this CPU runs (avx512, avx2, avx, sse4 or plain).

    ``cpuinfo`` is the text of ``/proc/cpuinfo`` (read when not given). Unlike the wheel's launcher,
    AMD CPUs get their vector build too.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
            break
    for build, flag in _BUILDS:
        if flag is None or flag in flags:
            return build
    return _BUILDS[-1][0]


#: What Intel-compiled MCsquare builds print (and exit) on a CPU they refuse, e.g. any AMD CPU for the
#: vector builds: their dispatcher checks the vendor as well as the instruction sets.
_REFUSED_CPU = "Please verify that both the operating system and the processor support"
_RUNNABLE: dict[Path, str] = {}


def runnable_build(root: Path) -> str:
    """The fastest installed build that actually runs here, probed once per process.

    :func:`select_build` reads the CPU flags; the Intel-compiled vector builds also refuse CPUs of other
    vendors with all the flags (seen on AMD EPYC with AVX-512), so each candidate, best first, is started
    on a missing configuration file and the first that gets as far as looking for it is kept.
    """
    root = Path(root)
    if root in _RUNNABLE:
        return _RUNNABLE[root]
    names = [b for b, _ in _BUILDS]
    first = names.index(select_build())
    for build in names[first:]:
        binary = root / build
        if not os.access(binary, os.X_OK):
            continue
        try:
            proc = subprocess.run([str(binary), "dota-probe-no-such-config.txt"], capture_output=True, text=True,
                                  timeout=30, cwd=tempfile.gettempdir())
        except (OSError, subprocess.TimeoutExpired):
            continue
        if _REFUSED_CPU not in proc.stdout + proc.stderr:
            _RUNNABLE[root] = build
            return build
    raise EngineUnavailableError(f"no MCsquare build in {root} runs on this CPU: {_INSTALL_HINT}")


@dataclass(frozen=True)
class MCsquareInstall:
    """Where the pieces of an installed MCsquare are."""

    root: Path
    binary: Path
    materials_dir: Path
    scanner_dir: Path
    beam_model: Path


def beam_model_path() -> Path:
    """The extended beam model (70-225 MeV) this package ships."""
    return Path(str(resources.files("dota").joinpath("resources", "mcsquare", BEAM_MODEL_FILE)))


def find_mcsquare(cache_dir: str | os.PathLike | None = None) -> MCsquareInstall:
    """Locate an installed MCsquare; raise :class:`EngineUnavailableError` with the install command if absent."""
    if sys.platform != "linux":
        raise EngineUnavailableError(f"the MCsquare engine runs on Linux x86-64 only, not {sys.platform}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if not (root / _MARKER).is_file():
        raise EngineUnavailableError(f"MCsquare is not installed in {root}: {_INSTALL_HINT}")
    binary = root / runnable_build(root)
    return MCsquareInstall(
        root=root,
        binary=binary,
        materials_dir=root / "Materials",
        scanner_dir=root / "Scanners" / SCANNER,
        beam_model=beam_model_path(),
    )


# --------------------------------------------------------------------------------------------------
# Beam model


@dataclass(frozen=True)
class BeamModel:
    """A double-Gaussian (UPenn format) MCsquare beam model: one row per nominal energy.

    ``columns`` follows the file's header (``NominalEnergy``, ``MeanEnergy``, ``EnergySpread``,
    ``ProtonsMU``, ...); ``table`` is (n_energies, n_columns).
    """

    header: str
    columns: tuple[str, ...]
    table: np.ndarray

    def column(self, name: str) -> np.ndarray:
        return self.table[:, self.columns.index(name)]


def read_beam_model(path: str | os.PathLike) -> BeamModel:
    """Parse a UPenn-format BDL file."""
    text = Path(path).read_text().replace("\r\n", "\n")
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.strip().startswith("NominalEnergy"):
            break
    else:
        raise DataFileError(f"{path} is not an MCsquare beam model (no NominalEnergy header)")
    columns = tuple(lines[i].split())
    rows = [[float(v) for v in ln.split()] for ln in lines[i + 1 :] if ln.strip() and not ln.startswith("#")]
    table = np.asarray(rows, dtype=np.float64)
    if table.ndim != 2 or table.shape[1] != len(columns):
        raise DataFileError(f"{path}: beam model rows do not have {len(columns)} columns")
    return BeamModel(header="\n".join(lines[:i]).rstrip() + "\n", columns=columns, table=table)


# --------------------------------------------------------------------------------------------------
# MCsquare files


def write_mhd(path: str | os.PathLike, array_zyx: np.ndarray, spacing_xyz_mm: Sequence[float],
              origin_xyz_mm: Sequence[float] = (0.0, 0.0, 0.0)) -> Path:
    """Write a MetaImage (``.mhd`` header + ``.raw`` data) from a C-order (z, y, x) array."""
    path = Path(path)
    types = {np.dtype(np.float32): "MET_FLOAT", np.dtype(np.int16): "MET_SHORT",
             np.dtype(np.float64): "MET_DOUBLE", np.dtype(np.int32): "MET_INT"}
    arr = np.ascontiguousarray(array_zyx)
    if arr.dtype not in types:
        arr = arr.astype(np.float32)
    raw = path.with_suffix(".raw")
    arr.astype(arr.dtype.newbyteorder("<"), copy=False).tofile(raw)
    nz, ny, nx = arr.shape
    path.write_text(
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        "CompressedData = False\n"
        f"Offset = {' '.join(f'{v:g}' for v in origin_xyz_mm)}\n"
        f"ElementSpacing = {' '.join(f'{v:g}' for v in spacing_xyz_mm)}\n"
        f"DimSize = {nx} {ny} {nz}\n"
        f"ElementType = {types[arr.dtype]}\n"
        f"ElementDataFile = {raw.name}\n"
    )
    return path


def read_mhd(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read an uncompressed MetaImage; return ``(array (z, y, x), spacing (x, y, z) mm)``."""
    path = Path(path)
    try:
        header = dict(
            (k.strip(), v.strip()) for k, v in (ln.split("=", 1) for ln in path.read_text().splitlines() if "=" in ln)
        )
        dims = [int(v) for v in header["DimSize"].split()]
        spacing = tuple(float(v) for v in header["ElementSpacing"].split())
        dtype = {"MET_FLOAT": "<f4", "MET_DOUBLE": "<f8", "MET_SHORT": "<i2", "MET_INT": "<i4"}[header["ElementType"]]
        data = np.fromfile(path.parent / header["ElementDataFile"], dtype=dtype)
    except (OSError, KeyError, ValueError) as exc:
        raise DataFileError(f"cannot read MetaImage {path}: {exc}") from None
    if data.size != int(np.prod(dims)):
        raise DataFileError(f"{path}: {data.size} values for a {dims} image")
    return data.reshape(dims[::-1]).astype(np.float32), spacing  # type: ignore[return-value]


#: Proton rest energy, MeV.
_PROTON_MEV = 938.272
#: Rows added below the shipped model's first commissioned energy (100 MeV).
EXTENSION_ENERGIES_MEV: tuple[float, ...] = (70.0, 75.0, 80.0, 85.0, 90.0, 95.0)
_SPOT_COLUMNS = ("SpotSize1x", "Divergence1x", "SpotSize1y", "Divergence1y",
                 "SpotSize2x", "Divergence2x", "SpotSize2y", "Divergence2y")


def _pv_mev(energy_mev: np.ndarray | float) -> np.ndarray:
    """Momentum times velocity, p*v = T (T + 2M) / (T + M), MeV: the 1/(pv) of multiple Coulomb scattering."""
    t = np.asarray(energy_mev, dtype=np.float64)
    return t * (t + 2 * _PROTON_MEV) / (t + _PROTON_MEV)


def _water_stopping_power(energy_mev: np.ndarray | float) -> np.ndarray:
    """Electronic mass stopping power of water (Bethe, I = 75 eV, no shell or density correction), MeV cm2/g.

    Used only for ratios between 70 and 100 MeV, where the omitted corrections cancel to < 0.3 %.
    """
    t = np.asarray(energy_mev, dtype=np.float64)
    gamma = 1 + t / _PROTON_MEV
    beta2 = 1 - 1 / gamma**2
    me = 0.51099895
    tmax = 2 * me * beta2 * gamma**2 / (1 + 2 * gamma * me / _PROTON_MEV + (me / _PROTON_MEV) ** 2)
    k_z_over_a = 0.307075 * (10 / 18.0153)  # K Z/A for H2O
    return k_z_over_a / beta2 * (0.5 * np.log(2 * me * 1e6 * beta2 * gamma**2 * tmax * 1e6 / 75.0**2) - beta2)


def extend_beam_model(shipped: BeamModel, energies_mev: Sequence[float] = EXTENSION_ENERGIES_MEV,
                      fit_range_mev: tuple[float, float] = (100.0, 150.0)) -> BeamModel:
    """Add physically scaled rows below 100 MeV to the shipped IBA dedicated-nozzle model.

    The shipped ``BDL_default_DN`` model is commissioned from 100 MeV; below, MCsquare would interpolate
    against a 20 MeV placeholder row (a copy of the 100 MeV row). Its placeholder is dropped and rows at
    ``energies_mev`` are added (sources and reasoning in ``resources/mcsquare/README.md``):

    - mean energy: nominal + the 100 MeV row's offset (the energy calibration of the lowest commissioned
      layer);
    - energy spread (% of the mean energy): constant relative momentum spread (the energy-selection slit's
      acceptance), ``dE/E = (T + 2M)/(T + M) * dp/p``, anchored at the 100 MeV row;
    - protons per MU: inversely proportional to the stopping power (the monitor chamber's charge per
      proton), anchored at 100 MeV;
    - spot sizes and divergences of both Gaussians: power law in p*v (multiple Coulomb scattering in the
      degrader and nozzle, theta0 ~ 1/(pv), Highland), exponent fitted on the ``fit_range_mev`` rows and
      anchored at the 100 MeV row;
    - Gaussian weights: linear in energy (slope fitted on the same rows, anchored at 100 MeV);
      correlations: the 100 MeV row's.
    """
    nominal = shipped.column("NominalEnergy")
    keep = nominal >= fit_range_mev[0] - 1e-6
    table = shipped.table[keep]
    nominal = table[:, shipped.columns.index("NominalEnergy")]
    fit = (nominal >= fit_range_mev[0] - 1e-6) & (nominal <= fit_range_mev[1] + 1e-6)
    anchor = table[np.argmin(nominal)]
    col = shipped.columns.index
    e_new = np.asarray(sorted(energies_mev), dtype=np.float64)
    if e_new.size and e_new.max() >= nominal.min():
        raise InputError(f"extension energies must lie below {nominal.min():g} MeV")
    rows = np.repeat(anchor[None], e_new.size, axis=0)
    e0 = anchor[col("NominalEnergy")]
    rows[:, col("NominalEnergy")] = e_new
    rows[:, col("MeanEnergy")] = e_new + (anchor[col("MeanEnergy")] - e0)
    kin = lambda t: (t + 2 * _PROTON_MEV) / (t + _PROTON_MEV)  # noqa: E731
    rows[:, col("EnergySpread")] = anchor[col("EnergySpread")] * kin(e_new) / kin(e0)
    rows[:, col("ProtonsMU")] = anchor[col("ProtonsMU")] * _water_stopping_power(e0) / _water_stopping_power(e_new)
    log_pv = np.log(_pv_mev(nominal[fit]))
    for name in _SPOT_COLUMNS:
        exponent = np.polyfit(log_pv, np.log(table[fit, col(name)]), 1)[0]
        rows[:, col(name)] = anchor[col(name)] * (_pv_mev(e_new) / _pv_mev(e0)) ** exponent
    slope = np.polyfit(nominal[fit], table[fit, col("Weight1")], 1)[0]
    rows[:, col("Weight1")] = anchor[col("Weight1")] + slope * (e_new - e0)
    rows[:, col("Weight2")] = 1.0 - rows[:, col("Weight1")]
    header = re.sub(r"# Beam data library.*\n",
                    "# Beam data library (IBA dedicated nozzle), extended to 70 MeV by dota: "
                    "see dota/resources/mcsquare/README.md\n", shipped.header)
    return BeamModel(header=header, columns=shipped.columns, table=np.concatenate([rows, table]))


def format_beam_model(model: BeamModel) -> str:
    """Text of a UPenn-format BDL file (LF line endings: MCsquare misreads CRLF beam models)."""
    header = re.sub(r"\d+ energies", f"{len(model.table)} energies", model.header)
    lines = [header.rstrip("\n"), "", " \t ".join(model.columns)]
    for row in model.table:
        lines.append(" \t ".join(f"{v:.6f}" if abs(v) < 1e6 else f"{v:.1f}" for v in row))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# The engine

#: MCsquare writes dose in eV/g per primary; times this gives Gy per 1e9 primaries.
_EV_PER_G_TO_GY_PER_1E9 = 1.602176634e-19 * 1e3 * PRIMARIES_UNIT
#: CT calibrations the engine offers (see :class:`MCsquareEngine`).
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


def _beamlet_seed(seed: int, index: int) -> int:
    """A positive 31-bit MCsquare seed for beamlet ``index`` of a call seeded with ``seed``."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0] % (2**31 - 2)) + 1


@register_engine("mcsquare")
class MCsquareEngine(DoseEngine):
    """Monte Carlo beamlet dose with MCsquare: one run per beamlet, dose to water, Gy per 1e9 primaries.

    Parameters
    ----------
    primaries
        Protons simulated per beamlet (statistical uncertainty at the peak about 7 % at 1e4, 2 % at 1e5).
    threads
        MCsquare threads per run. Results are bit-reproducible for a given seed only with 1 thread.
    seed
        Base seed; beamlet ``i`` of a :meth:`dose` call uses a seed derived from ``(seed, i)`` unless
        ``seeds`` are given.
    hu_calibration
        ``"dota"`` (default: the stopping power of :func:`dota.physics.hu_to_rsp`, shared with the
        analytic engine, with the tissue materials of MCsquare's UCL_Toshiba calibration; see
        :func:`build_dota_scanner`), ``"UCL_Toshiba"`` (MCsquare's own Schneider-type calibration) or
        ``"water"`` (every voxel water, density from HU: the water tank of the range validation).
    cache_dir
        Where MCsquare is installed (default :func:`default_cache_dir`).
    timeout_s
        Time limit of one MCsquare run.
    """

    name = "mcsquare"
    accepts_seeds = True

    def __init__(self, primaries: int = MCSQUARE_DEFAULT_PRIMARIES, threads: int = 1, seed: int = 1,
                 hu_calibration: str = "dota", cache_dir: str | os.PathLike | None = None,
                 timeout_s: float = 3600.0) -> None:
        if int(primaries) < 1:
            raise InputError(f"primaries must be a positive number of protons, got {primaries}")
        if int(threads) < 1:
            raise InputError(f"threads must be >= 1, got {threads}")
        if hu_calibration not in HU_CALIBRATIONS:
            choices = ", ".join(HU_CALIBRATIONS)
            raise InputError(f"unknown hu_calibration {hu_calibration!r}; choose from {choices}")
        self.install = find_mcsquare(cache_dir)
        self.primaries = int(primaries)
        self.threads = int(threads)
        self.seed = int(seed)
        self.hu_calibration = hu_calibration
        self.timeout_s = float(timeout_s)
        self.energy_range_mev = ENGINE_ENERGY_RANGE_MEV
        self.scanner_dir = _scanner_dir(self.install, hu_calibration)
        digest = hashlib.sha256(self.install.beam_model.read_bytes()).hexdigest()[:8]
        self.version = f"MCsquare 1.1 ({MCSQUARE_WHEEL}, {self.install.binary.name}); beam model {digest}"

    def dose(self, geometry_hu: np.ndarray, energies_mev: np.ndarray, voxel_mm: tuple[float, float, float] = VOXEL_MM,
             *, seeds: Sequence[int] | None = None) -> np.ndarray:
        geometry, energies = check_beamlets(geometry_hu, energies_mev, energy_range_mev=self.energy_range_mev)
        if seeds is None:
            seeds = [_beamlet_seed(self.seed, i) for i in range(len(energies))]
        elif len(seeds) != len(energies):
            raise InputError(f"{len(seeds)} seeds for {len(energies)} beamlets")
        out = np.empty(geometry.shape, dtype=np.float32)
        for i in range(len(energies)):
            out[i] = self.dose_one(geometry[i], float(energies[i]), voxel_mm, seed=int(seeds[i]))
        return out

    def dose_one(self, block_hu: np.ndarray, energy_mev: float, voxel_mm: tuple[float, float, float] = VOXEL_MM,
                 *, seed: int = 1) -> np.ndarray:
        """Dose (L, H, W) in Gy per 1e9 primaries of one beamlet entering block ``(L, H, W)`` at depth 0."""
        if not 1 <= seed < 2**31:
            raise InputError(f"MCsquare seeds must lie in 1 .. 2**31-1, got {seed}")
        depth_mm, row_mm, col_mm = (float(v) for v in voxel_mm)
        length, height, width = block_hu.shape
        with tempfile.TemporaryDirectory(prefix="dota-mcsquare-") as tmp:
            work = Path(tmp)
            # MCsquare frame: x = block column, y = depth (gantry 180 sends the beam along +y from y = 0),
            # z = block row. The isocentre sits at the centre of the entrance face.
            ct_zyx = np.clip(np.transpose(block_hu, (1, 0, 2)), *HU_CLIP).astype(np.float32)
            write_mhd(work / "CT.mhd", ct_zyx, (col_mm, depth_mm, row_mm))
            iso = (width * col_mm / 2, 0.0, height * row_mm / 2)
            (work / "plan.txt").write_text(_one_spot_plan(energy_mev, iso))
            (work / "config.txt").write_text(self._config(seed))
            env = dict(os.environ, MCsquare_Materials_Dir=str(self.install.materials_dir))
            try:
                proc = subprocess.run([str(self.install.binary), "config.txt"], cwd=work, env=env,
                                      capture_output=True, text=True, timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                raise EngineUnavailableError(f"MCsquare ran longer than {self.timeout_s:g} s on one beamlet") from None
            dose_file = work / "Outputs" / "Dose.mhd"
            if proc.returncode != 0 or not dose_file.is_file():
                msg = (proc.stdout + proc.stderr).strip().splitlines()
                errors = [ln for ln in msg if "rror" in ln] or msg[-1:] or ["no output"]
                raise EngineUnavailableError(f"MCsquare failed (exit {proc.returncode}): {errors[0].strip()}")
            dose_zyx, _ = read_mhd(dose_file)
        if dose_zyx.shape != ct_zyx.shape:
            raise DataFileError(f"MCsquare dose grid {dose_zyx.shape} differs from the CT grid {ct_zyx.shape}")
        return (np.transpose(dose_zyx, (1, 0, 2)) * _EV_PER_G_TO_GY_PER_1E9).astype(np.float32)

    def _config(self, seed: int) -> str:
        settings = {
            "Num_Threads": self.threads,
            "RNG_Seed": seed,
            "Num_Primaries": self.primaries,
            "CT_File": "CT.mhd",
            "HU_Density_Conversion_File": self.scanner_dir / "HU_Density_Conversion.txt",
            "HU_Material_Conversion_File": self.scanner_dir / "HU_Material_Conversion.txt",
            "BDL_Machine_Parameter_File": self.install.beam_model,
            "BDL_Plan_File": "plan.txt",
            "Compute_stat_uncertainty": False,
            "Output_Directory": "Outputs",
            "Dose_MHD_Output": True,
            "Dose_to_Water_conversion": "OnlineSPR",
        }
        return "".join(f"{k} {v}\n" for k, v in settings.items())

    def file_attrs(self) -> dict[str, object]:
        from dota.physics import HU_CALIBRATION_NAME

        attrs = super().file_attrs()
        attrs["hu_calibration"] = {
            "dota": f"{HU_CALIBRATION_NAME} (MCsquare materials: UCL_Toshiba)",
            "UCL_Toshiba": "MCsquare UCL_Toshiba",
            "water": "water (density from HU)",
        }[self.hu_calibration]
        return attrs


def _scanner_dir(install: MCsquareInstall, hu_calibration: str) -> Path:
    """Folder with ``HU_Density_Conversion.txt`` and ``HU_Material_Conversion.txt`` for a calibration."""
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


def _one_spot_plan(energy_mev: float, isocentre_mm: tuple[float, float, float]) -> str:
    """A PBS plan with one field (gantry 180, couch 0), one layer, one spot of 1 MU at the isocentre."""
    x, y, z = isocentre_mm
    return (
        "#TREATMENT-PLAN-DESCRIPTION\n#PlanName\ndota_beamlet\n#NumberOfFractions\n1\n##FractionID\n1\n"
        "##NumberOfFields\n1\n###FieldsID\n1\n#TotalMetersetWeightOfAllFields\n1.0\n\n"
        "#FIELD-DESCRIPTION\n###FieldID\n1\n###FinalCumulativeMeterSetWeight\n1.0\n"
        f"###GantryAngle\n180.0\n###PatientSupportAngle\n0.0\n###IsocenterPosition\n{x:.4f}\t{y:.4f}\t{z:.4f}\n"
        "###NumberOfControlPoints\n1\n\n#SPOTS-DESCRIPTION\n####ControlPointIndex\n1\n####SpotTunnedID\n1\n"
        f"####CumulativeMetersetWeight\n1.0\n####Energy (MeV)\n{energy_mev:.4f}\n####NbOfScannedSpots\n1\n"
        "####X Y Weight\n0.0 0.0 1.0\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dota.engines.mcsquare --install | --where | --write-beam-model PATH``."""
    parser = argparse.ArgumentParser(prog="python -m dota.engines.mcsquare", description=__doc__.split("\n")[0])
    parser.add_argument("--install", action="store_true", help=f"download {MCSQUARE_WHEEL} and install MCsquare")
    parser.add_argument("--force", action="store_true", help="reinstall even when installed")
    parser.add_argument("--cache-dir", default=None, help="install folder (default: $DOTA_CACHE/mcsquare or ~/.cache)")
    parser.add_argument("--wheel", default=None, help="a local copy of the opentps-core 2.0.0 wheel")
    parser.add_argument("--where", action="store_true", help="print the install folder and the build this CPU uses")
    parser.add_argument("--write-beam-model", metavar="PATH", default=None,
                        help="regenerate the extended beam model from the installed shipped one")
    args = parser.parse_args(argv)
    try:
        if args.install:
            root = install_mcsquare(args.cache_dir, wheel=args.wheel, force=args.force)
            print(f"MCsquare installed in {root} (build {runnable_build(root)})")
        if args.where:
            inst = find_mcsquare(args.cache_dir)
            print(f"{inst.root}\n{inst.binary}")
        if args.write_beam_model:
            inst = find_mcsquare(args.cache_dir)
            shipped = read_beam_model(inst.root / "BDL" / "BDL_default_DN_RangeShifter.txt")
            Path(args.write_beam_model).write_text(format_beam_model(extend_beam_model(shipped)))
            print(f"wrote {args.write_beam_model}")
    except (EngineUnavailableError, DataFileError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
