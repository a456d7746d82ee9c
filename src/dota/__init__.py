"""dota: proton beamlet dose with DoTA transformers, exact KV caching and Monte Carlo ground truth.

Curated public API (imported lazily, so ``import dota`` stays light)::

    import dota
    engine = dota.get_engine("dota")                        # the shipped default model, exact caching engine
    dose = engine.dose(geometry_hu, energies_mev)           # (N, L, H, W) Gy per 1e9 primaries
    mc = dota.get_engine("mcsquare", primaries=100_000)     # the same interface, Monte Carlo
    model = dota.load_model("runs/train/best.safetensors")  # a network (torch module): "default", a preset, a path
    dose = dota.InferenceEngine(model).predict(geometry_hu, energies_mev)
"""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("dota-dose")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

logging.getLogger(__name__).addHandler(logging.NullHandler())

_API = {
    "DoTA": "dota.model",
    "DoTAConfig": "dota.model",
    "Normalization": "dota.model",
    "dota_energies": "dota.seed",
    "load_model": "dota.checkpoint",
    "save_model": "dota.checkpoint",
    "InferenceEngine": "dota.inference",
    "get_engine": "dota.engines",
    "available_engines": "dota.engines",
    "DoseEngine": "dota.engines",
    "BeamletFile": "dota.data",
    "BeamletDataset": "dota.data",
    "read_dataset": "dota.data",
    "write_dataset": "dota.data",
    "import_original_dota": "dota.data",
    "gamma_index": "dota.evaluation.gamma",
    "paper_gamma": "dota.evaluation.gamma",
    "train": "dota.train",
    "TrainConfig": "dota.train",
    "evaluate": "dota.evaluate",
    "DotaError": "dota.errors",
    "InputError": "dota.errors",
    "DataFileError": "dota.errors",
    "EngineUnavailableError": "dota.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'dota' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
