"""A stand-in for the MCsquare binary, so the engine's runs can be tested without MCsquare (and fast).

It reads ``config.txt`` as MCsquare does, appends the run's ``RNG_Seed`` to a log, and writes the CT it was
given back as ``Outputs/Dose.mhd`` (same grid, values = the CT's HU): what comes back out of the engine
then shows every axis flip and transposition between the caller's frame and MCsquare's. Seed 13 makes it
fail the way MCsquare does (an error line, a non-zero exit).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dota.engines import mcsquare as mc

#: The seed on which the stand-in fails.
FAILING_SEED = 13

_SCRIPT = """#!{python}
import pathlib, shutil, sys
cfg = dict(line.split(" ", 1) for line in pathlib.Path(sys.argv[1]).read_text().splitlines())
with open({log!r}, "a") as log:
    log.write(cfg["RNG_Seed"] + "\\n")
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
    binary.write_text(_SCRIPT.format(python=sys.executable, log=str(log), failing=FAILING_SEED))
    binary.chmod(0o755)
    install = mc.MCsquareInstall(root=folder, binary=binary, materials_dir=folder / "Materials",
                                 scanner_dir=folder / "Scanners" / mc.SCANNER, beam_model=mc.beam_model_path())
    monkeypatch.setattr("dota.engines.mcsquare.engine.find_mcsquare", lambda cache_dir=None: install)
    return log


def logged_seeds(log: Path) -> list[int]:
    return [int(v) for v in log.read_text().split()] if log.exists() else []
