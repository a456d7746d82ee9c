"""The MCsquare dose engine: one MCsquare run per beamlet (:meth:`MCsquareEngine.simulate` runs any CT and plan).

Each beamlet's beam's-eye-view block is written as a CT (MetaImage), with a one-spot plan at the centre
of the entrance face and the extended beam model of ``dota/resources/mcsquare`` (70-225 MeV). The dose
(to water) is read back and converted to Gy per 1e9 primaries.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
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
from dota.engines.base import DoseEngine, beamlet_seed
from dota.engines.mcsquare.calibration import HU_CALIBRATIONS, calibration_description, scanner_dir
from dota.engines.mcsquare.install import find_mcsquare
from dota.engines.mcsquare.mhd import read_mhd, write_mhd
from dota.errors import DataFileError, EngineUnavailableError, InputError
from dota.validation import check_beamlets

log = logging.getLogger("dota.mcsquare")

#: Reruns of a run that MCsquare ended with a crash (killed by a signal), each with the next
#: :func:`crash_retry_seed`. MCsquare 1.1 segfaults on rare (block, seed) pairs: measured on a head-and-neck
#: plan block (130.7 MeV) that crashed with one seed every time and ran with four others.
CRASH_RETRIES: int = 2

#: MCsquare writes dose in eV/g per primary; times this gives Gy per primary.
EV_PER_G_TO_GY = 1.602176634e-19 * 1e3
_EV_PER_G_TO_GY_PER_1E9 = EV_PER_G_TO_GY * PRIMARIES_UNIT


def crash_retry_seed(seed: int, attempt: int) -> int:
    """The seed of rerun ``attempt`` (1, 2, ...) of a run with ``seed`` that MCsquare crashed on: stream 0 of
    ``SeedSequence(seed, spawn_key=(attempt,))`` in 1 .. 2**31 - 1, so a rerun is as reproducible as the run."""
    state = np.random.SeedSequence(int(seed), spawn_key=(int(attempt),)).generate_state(1)[0]
    return int(state % (2**31 - 2)) + 1


class MCsquareEngine(DoseEngine):
    """Monte Carlo beamlet dose with MCsquare: one run per beamlet, dose to water, Gy per 1e9 primaries.

    Parameters
    ----------
    primaries
        Protons simulated per beamlet (statistical uncertainty at the peak about 7 % at 1e4, 2 % at 1e5).
    threads
        MCsquare threads per run. Results are bit-reproducible for a given seed only with 1 thread.
    seed
        Master seed: beamlet ``i`` of a :meth:`dose` call without ``seeds`` gets
        :func:`dota.engines.base.beamlet_seed` ``(seed, i)``, the seed ``dota generate --seed`` gives it.
    hu_calibration
        ``"dota"`` (default: the stopping power of :func:`dota.physics.hu_to_rsp`, shared with the
        analytic engine, with the tissue materials of MCsquare's UCL_Toshiba calibration; see
        :func:`~dota.engines.mcsquare.build_dota_scanner`), ``"UCL_Toshiba"`` (MCsquare's own
        Schneider-type calibration) or ``"water"`` (every voxel water, density from HU: the water tank of
        the range validation).
    cache_dir
        Where MCsquare is installed (default :func:`~dota.engines.mcsquare.default_cache_dir`).
    timeout_s
        Time limit of one MCsquare run.
    """

    name = "mcsquare"
    mcsquare_blocks = True  # in-block dose only, the isocentre spot at the block entrance

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
        #: ``(seed, rerun seed)`` of every run of this engine that MCsquare crashed on and a rerun completed.
        self.crash_reruns: list[tuple[int, int]] = []
        self.energy_range_mev = ENGINE_ENERGY_RANGE_MEV
        self.scanner_dir = scanner_dir(self.install, hu_calibration)
        digest = hashlib.sha256(self.install.beam_model.read_bytes()).hexdigest()[:8]
        self.version = f"MCsquare 1.1 ({MCSQUARE_WHEEL}, {self.install.binary.name}); beam model {digest}"

    def dose(self, geometry_hu: np.ndarray, energies_mev: np.ndarray, voxel_mm: tuple[float, float, float] = VOXEL_MM,
             *, seeds: Sequence[int] | None = None) -> np.ndarray:
        """Dose of each beamlet (:meth:`dose_one`); beamlet ``i`` runs with ``seeds[i]``, by default
        ``beamlet_seed(self.seed, i)``."""
        geometry, energies = check_beamlets(geometry_hu, energies_mev, energy_range_mev=self.energy_range_mev)
        if seeds is None:
            seeds = [beamlet_seed(self.seed, i) for i in range(len(energies))]
        elif len(seeds) != len(energies):
            raise InputError(f"{len(seeds)} seeds for {len(energies)} beamlets")
        out = np.empty(geometry.shape, dtype=np.float32)
        for i in range(len(energies)):
            out[i] = self.dose_one(geometry[i], float(energies[i]), voxel_mm, seed=int(seeds[i]))
        return out

    def dose_one(self, block_hu: np.ndarray, energy_mev: float, voxel_mm: tuple[float, float, float] = VOXEL_MM,
                 *, seed: int = 1) -> np.ndarray:
        """Dose (L, H, W) in Gy per 1e9 primaries of one beamlet entering block ``(L, H, W)`` at depth 0."""
        depth_mm, row_mm, col_mm = (float(v) for v in voxel_mm)
        _, height, width = block_hu.shape
        # MCsquare frame: x = block column (reversed by MCsquare, see dota.plan.mcsquare_plan; no matter
        # here, the spot is at the centre), y = depth (gantry 180 sends the beam along +y from y = 0),
        # z = block row. The isocentre sits at the centre of the entrance face.
        ct_zyx = np.transpose(block_hu, (1, 0, 2))
        iso = (width * col_mm / 2, 0.0, height * row_mm / 2)
        dose_zyx = self.simulate(ct_zyx, (col_mm, depth_mm, row_mm), _one_spot_plan(energy_mev, iso), seed)
        return (np.transpose(dose_zyx, (1, 0, 2)) * _EV_PER_G_TO_GY_PER_1E9).astype(np.float32)

    def config_text(self, seed: int) -> str:
        """MCsquare's ``config.txt`` for a run with this engine's settings and ``seed`` (1 .. 2**31 - 1), on
        ``CT.mhd`` and ``plan.txt`` in the run's folder, writing ``Outputs/Dose.mhd`` (dose to water)."""
        if not 1 <= int(seed) < 2**31:
            raise InputError(f"MCsquare seeds must lie in 1 .. 2**31-1, got {seed}")
        settings = {
            "Num_Threads": self.threads,
            "RNG_Seed": int(seed),
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

    def simulate(self, ct_zyx: np.ndarray, spacing_xyz_mm: Sequence[float], plan_text: str, seed: int, *,
                 folder: str | os.PathLike | None = None, job: str = "one beamlet") -> np.ndarray:
        """Run MCsquare once: the CT ``ct_zyx`` (HU, clipped to ``HU_CLIP``; MCsquare's frame, corner at the
        origin) with voxel size ``spacing_xyz_mm``, the PlanPencil plan ``plan_text`` and :meth:`config_text`
        ``(seed)``. Returns the dose to water (z, y, x) in eV/g per primary (times :data:`EV_PER_G_TO_GY`:
        Gy per primary).

        The files are written into ``folder`` and kept there when it is given (a temporary folder
        otherwise); ``job`` names the run in error messages. A run MCsquare crashes on (killed by a signal)
        is rerun up to :data:`CRASH_RETRIES` times with :func:`crash_retry_seed` ``(seed, 1)``, ``(seed, 2)``
        (a warning says so, and :attr:`crash_reruns` records it); an error MCsquare reports itself (non-zero
        exit) fails at once.
        """
        ct = np.clip(ct_zyx, *HU_CLIP).astype(np.float32)
        run_seed = int(seed)
        for attempt in range(CRASH_RETRIES + 1):
            if attempt:
                run_seed = crash_retry_seed(seed, attempt)
            with tempfile.TemporaryDirectory(prefix="dota-mcsquare-") as tmp:
                work = Path(folder) if folder is not None else Path(tmp)
                work.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(work / "Outputs", ignore_errors=True)  # a crashed run's leftovers
                write_mhd(work / "CT.mhd", ct, spacing_xyz_mm)
                (work / "plan.txt").write_text(plan_text)
                (work / "config.txt").write_text(self.config_text(run_seed))
                env = dict(os.environ, MCsquare_Materials_Dir=str(self.install.materials_dir))
                try:
                    proc = subprocess.run([str(self.install.binary), "config.txt"], cwd=work, env=env,
                                          capture_output=True, text=True, timeout=self.timeout_s)
                except subprocess.TimeoutExpired:
                    raise EngineUnavailableError(f"MCsquare ran longer than {self.timeout_s:g} s on {job}") from None
                dose_file = work / "Outputs" / "Dose.mhd"
                if proc.returncode == 0 and dose_file.is_file():
                    dose_zyx, _ = read_mhd(dose_file)
                    if attempt:
                        self.crash_reruns.append((int(seed), run_seed))
                    break
                msg = (proc.stdout + proc.stderr).strip().splitlines()
                errors = [ln for ln in msg if "rror" in ln] or msg[-1:] or ["no output"]
                failure = f"MCsquare failed on {job} (exit {proc.returncode}): {errors[0].strip()}"
                if proc.returncode >= 0 or attempt == CRASH_RETRIES:
                    if attempt:
                        failure += f" (seed {seed} and {attempt} rerun(s) with crash_retry_seed)"
                    raise EngineUnavailableError(failure)
                log.warning("%s with seed %d (killed by signal %d); rerunning with seed %d", failure, run_seed,
                            -proc.returncode, crash_retry_seed(seed, attempt + 1))
        if dose_zyx.shape != ct.shape:
            raise DataFileError(f"MCsquare dose grid {dose_zyx.shape} differs from the CT grid {ct.shape}")
        return dose_zyx

    def file_attrs(self) -> dict[str, object]:
        attrs = super().file_attrs()
        attrs["hu_calibration"] = calibration_description(self.hu_calibration)
        return attrs


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
