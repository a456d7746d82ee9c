"""Dose engines behind one interface: ``get_engine("analytic" | "analytic-bdl" | "mcsquare" | "dota" | "stored")``."""

from dota.engines.base import DoseEngine, available_engines, beamlet_seed, get_engine, register_engine

__all__ = ["DoseEngine", "available_engines", "beamlet_seed", "get_engine", "register_engine"]
