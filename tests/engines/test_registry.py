"""The engine interface and registry: built-in engines listed explicitly, seeds in every engine's ``dose``,
one seed derivation."""

from __future__ import annotations

import inspect
import subprocess
import sys

import numpy as np
import pytest

from dota.engines import DoseEngine, available_engines, get_engine, register_engine
from dota.engines.base import _REGISTRY, BUILTIN_ENGINES, beamlet_seed
from dota.errors import InputError


def test_builtin_engines_are_listed_without_importing_them() -> None:
    code = ("import sys; from dota.engines import available_engines; names = available_engines(); "
            "print(names, [m for m in ('dota.engines.analytic', 'dota.engines.mcsquare', 'dota.engines.learned', 'dota.engines.stored') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['analytic', 'analytic-bdl', 'dota', 'mcsquare', 'stored'] []"


def test_unknown_engine_names_the_available_ones() -> None:
    with pytest.raises(InputError, match="unknown dose engine 'nope'; available: analytic, analytic-bdl, dota"):
        get_engine("nope")


def test_every_builtin_engine_takes_seeds_in_dose() -> None:
    """Seeds are part of the one interface (no ``accepts_seeds`` flag); deterministic engines ignore them."""
    import importlib

    classes = {getattr(importlib.import_module(target.split(":")[0]), target.split(":")[1])
               for target, _ in BUILTIN_ENGINES.values()} | {DoseEngine}
    assert {c.__name__ for c in classes} == {"AnalyticEngine", "LearnedEngine", "MCsquareEngine", "StoredBeamletEngine",
                                            "DoseEngine"}
    for cls in classes:
        seeds = inspect.signature(cls.dose).parameters["seeds"]
        assert seeds.kind is inspect.Parameter.KEYWORD_ONLY and seeds.default is None, cls
        assert not hasattr(cls, "accepts_seeds"), cls
    geometry = np.zeros((1, 40, 8, 8), np.float32)
    engine = get_engine("analytic")
    np.testing.assert_array_equal(engine.dose(geometry, [100.0], seeds=[3]), engine.dose(geometry, [100.0]))
    assert get_engine("analytic-bdl").spot_model == "beam-model"


def test_registered_engines_join_the_builtins() -> None:
    @register_engine("test-constant")
    class Constant(DoseEngine):
        name = "test-constant"

        def dose(self, geometry_hu, energies_mev, voxel_mm=(2.0, 2.0, 2.0), *, seeds=None):
            return np.ones(np.shape(geometry_hu), np.float32)

    try:
        assert "test-constant" in available_engines()
        assert isinstance(get_engine("test-constant"), Constant)
    finally:
        del _REGISTRY["test-constant"]


def test_beamlet_seed_is_stream_one_of_the_beamlets_seed_sequence() -> None:
    """Pinned: the seeds ``dota generate --seed 5`` (and 202) gave before there was one function for it."""
    assert [beamlet_seed(5, i) for i in range(3)] == [657807347, 440268364, 1558476884]
    assert [beamlet_seed(202, i) for i in (0, 199)] == [939493748, 1904740948]
    state = np.random.SeedSequence(9, spawn_key=(4, 1)).generate_state(1)[0]
    assert beamlet_seed(9, 4) == int(state % (2**31 - 2)) + 1
    assert all(1 <= beamlet_seed(s, i) < 2**31 for s in range(5) for i in range(50))
