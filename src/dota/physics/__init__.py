"""Proton physics the engines and the inference share: HU calibration, ranges in water, the analytic
Bragg curve, lateral spread, water-equivalent depth, stopping depth, the Bethe stopping power of water,
relativistic kinematics (proton mass, p*v), and procedural phantoms.

Everything here is an analytic approximation meant for the fast baseline engine, for truncation
bounds and for tests; Monte Carlo (``get_engine("mcsquare")``) is the ground truth.
"""

from dota.physics.bragg import (
    beam_extent_wed_mm,
    bragg_sigma_mm,
    depth_dose_mev_cm2_g,
    energy_spread_mev,
    r80_mm,
    water_depth_dose,
)
from dota.physics.depth import stopping_depth_index, water_equivalent_depth_mm
from dota.physics.hu import HU_CALIBRATION_NAME, HU_CALIBRATION_TABLE, hu_to_density, hu_to_rsp
from dota.physics.lateral import mcs_sigma_mm, mcs_sigma_water_mm, spot_sigma_mm
from dota.physics.phantoms import MATERIAL_HU_RANGES, PHANTOM_KINDS, make_phantom
from dota.physics.ranges import PROTON_MASS_MEV, csda_range_mm, energy_from_csda_range_mev, load_pstar, pv_mev
from dota.physics.stopping import bethe_water_stopping_power

__all__ = [
    "HU_CALIBRATION_NAME",
    "HU_CALIBRATION_TABLE",
    "MATERIAL_HU_RANGES",
    "PHANTOM_KINDS",
    "PROTON_MASS_MEV",
    "beam_extent_wed_mm",
    "bethe_water_stopping_power",
    "bragg_sigma_mm",
    "csda_range_mm",
    "depth_dose_mev_cm2_g",
    "energy_from_csda_range_mev",
    "energy_spread_mev",
    "hu_to_density",
    "hu_to_rsp",
    "load_pstar",
    "make_phantom",
    "mcs_sigma_mm",
    "mcs_sigma_water_mm",
    "pv_mev",
    "r80_mm",
    "spot_sigma_mm",
    "stopping_depth_index",
    "water_depth_dose",
    "water_equivalent_depth_mm",
]
