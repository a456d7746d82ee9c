"""Dose engines behind one interface: ``get_engine("analytic" | "mcsquare" | "dota")``."""

from dota.engines.base import DoseEngine, available_engines, get_engine, register_engine

__all__ = ["DoseEngine", "available_engines", "get_engine", "register_engine"]
