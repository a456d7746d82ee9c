"""A stand-in for the MCsquare binary, so the engine's runs can be tested without MCsquare (and fast).

It reads ``config.txt`` as MCsquare does, appends the run's ``RNG_Seed`` to a log, and writes the CT it was
given back as ``Outputs/Dose.mhd`` (same grid, values = the CT's HU): what comes back out of the engine
then shows every axis flip and transposition between the caller's frame and MCsquare's. Seed 13 makes it
fail the way MCsquare does (an error line, a non-zero exit); the seeds listed in ``crash_seeds.txt`` beside
the log (:func:`crash_on`) make it crash the way MCsquare 1.1 sometimes does (killed by SIGSEGV).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dota.engines import mcsquare as mc

#: The seed on which the stand-in fails.
FAILING_SEED = 13

_SCRIPT = """#!{python}
import os, pathlib, shutil, signal, sys
cfg = dict(line.split(" ", 1) for line in pathlib.Path(sys.argv[1]).read_text().splitlines())
with open({log!r}, "a") as log:
    log.write(cfg["RNG_Seed"] + "\\n")
crash = pathlib.Path({crash!r})
if crash.exists() and cfg["RNG_Seed"] in crash.read_text().split():
    out = pathlib.Path(cfg["Output_Directory"])
    out.mkdir()
    (out / "partial.txt").write_text("40.0 %")
    os.kill(os.getpid(), signal.SIGSEGV)
if cfg["RNG_Seed"] == "{failing}":
    print("ERROR: stand-in refuses this seed")
    sys.exit(3)
out = pathlib.Path(cfg["Output_Directory"])
out.mkdir()
header = pathlib.Path(cfg["CT_File"]).read_text().replace("CT.raw", "Dose.raw")
(out / "Dose.mhd").write_text(header)
shutil.copyfile("CT.raw", out / "Dose.raw")
"""


def install_stand_in(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make :class:`~dota.engines.mcsquare.MCsquareEngine` run the stand-in; returns the seed log's path.

    Use the engine with ``hu_calibration="water"`` (its scanner ships with the package)."""
    log = folder / "seeds.txt"
    binary = folder / "MCsquare_stand_in"
    binary.write_text(_SCRIPT.format(python=sys.executable, log=str(log), failing=FAILING_SEED,
                                     crash=str(folder / "crash_seeds.txt")))
    binary.chmod(0o755)
    install = mc.MCsquareInstall(root=folder, binary=binary, materials_dir=folder / "Materials",
                                 scanner_dir=folder / "Scanners" / mc.SCANNER, beam_model=mc.beam_model_path())
    monkeypatch.setattr("dota.engines.mcsquare.engine.find_mcsquare", lambda cache_dir=None: install)
    return log


def crash_on(log: Path, seeds: list[int]) -> None:
    """Make the stand-in whose seed log is ``log`` crash (SIGSEGV) on ``seeds``."""
    (log.parent / "crash_seeds.txt").write_text("".join(f"{s}\n" for s in seeds))


def logged_seeds(log: Path) -> list[int]:
    return [int(v) for v in log.read_text().split()] if log.exists() else []
