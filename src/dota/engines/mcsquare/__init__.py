"""Monte Carlo ground truth with MCsquare (UCLouvain / IBA, Apache-2.0), driven as a binary.

One module per concern, every public name re-exported here:

- :mod:`~dota.engines.mcsquare.install`: the ``opentps-core==2.0.0`` wheel MCsquare ships in, installing
  it (:func:`install_mcsquare`), the build this CPU runs (:func:`select_build`, :func:`runnable_build`),
  finding an install (:func:`find_mcsquare`);
- :mod:`~dota.engines.mcsquare.beam_model`: BDL beam models, read, extended below 100 MeV and written
  (:data:`BEAM_MODEL_FILE`, the 70-225 MeV model this package ships);
- :mod:`~dota.engines.mcsquare.calibration`: HU -> density and material tables (:data:`HU_CALIBRATIONS`);
- :mod:`~dota.engines.mcsquare.mhd`: MetaImage files, as MCsquare reads its CT and writes its dose;
- :mod:`~dota.engines.mcsquare.engine`: :class:`MCsquareEngine`, registered as ``get_engine("mcsquare")``.

Set-up (``scripts/setup.sh`` does it)::

    dota mcsquare install
"""

from dota.engines.mcsquare.beam_model import (
    BEAM_MODEL_FILE,
    EXTENSION_ENERGIES_MEV,
    SHIPPED_BEAM_MODEL,
    BeamModel,
    beam_model_path,
    extend_beam_model,
    format_beam_model,
    read_beam_model,
)
from dota.engines.mcsquare.calibration import (
    HU_CALIBRATIONS,
    build_dota_scanner,
    calibration_description,
    material_stopping_power_ratio,
    read_material_bins,
    scanner_dir,
)
from dota.engines.mcsquare.engine import CRASH_RETRIES, EV_PER_G_TO_GY, MCsquareEngine, crash_retry_seed
from dota.engines.mcsquare.install import (
    SCANNER,
    MCsquareInstall,
    default_cache_dir,
    find_mcsquare,
    install_mcsquare,
    runnable_build,
    select_build,
)
from dota.engines.mcsquare.mhd import read_mhd, write_mhd

__all__ = [
    "BEAM_MODEL_FILE",
    "CRASH_RETRIES",
    "EV_PER_G_TO_GY",
    "EXTENSION_ENERGIES_MEV",
    "HU_CALIBRATIONS",
    "SCANNER",
    "SHIPPED_BEAM_MODEL",
    "BeamModel",
    "MCsquareEngine",
    "MCsquareInstall",
    "beam_model_path",
    "build_dota_scanner",
    "calibration_description",
    "crash_retry_seed",
    "default_cache_dir",
    "extend_beam_model",
    "find_mcsquare",
    "format_beam_model",
    "install_mcsquare",
    "material_stopping_power_ratio",
    "read_beam_model",
    "read_material_bins",
    "read_mhd",
    "runnable_build",
    "scanner_dir",
    "select_build",
    "write_mhd",
]
