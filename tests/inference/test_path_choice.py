"""The engine takes the plain pass where truncation and caching do not pay (``path="auto"``)."""

import numpy as np

from dota.inference import InferenceEngine
from dota.inference.engine import PathChooser, geometry_digests

from .helpers import phantoms


def test_chooser_measures_both_then_keeps_the_faster_and_reprobes():
    c = PathChooser(probe_every=8, samples=2)
    key = ("distinct", 0)
    seen = []
    for _ in range(24):
        path = c.choose(key)
        seen.append(path)
        c.record(key, path, 0.010 if path == "engine" else 0.004)  # the plain pass is faster here
    assert seen[:4] == ["engine", "engine", "plain", "plain"]
    later = seen[4:]
    assert later.count("plain") >= len(later) - 3 and "engine" in later  # mostly plain, re-probed
    assert "plain" in next(iter(c.decisions().values()))


def test_kind_of_request_separates_shared_geometry():
    g = phantoms(["heterogeneous", "lung"], 1)
    assert PathChooser.key(geometry_digests(np.repeat(g[:1], 4, 0)))[0] == "shared"
    assert PathChooser.key(geometry_digests(g))[0] == "distinct"


def test_auto_path_gives_the_plain_dose_whichever_it_takes(tiny):
    g = phantoms(["heterogeneous", "lung", "bone"], 2)
    e = np.array([90.0, 150.0, 210.0], np.float32)
    plain = InferenceEngine(tiny, path="plain").predict(g, e)
    auto = InferenceEngine(tiny, path="auto", verify_tail=True)
    paths = set()
    for _ in range(5):
        out = auto.predict(g, e)
        paths.add(auto.last_stats["path"])
        assert np.abs(out - plain).max() <= 1e-3 * plain.max()  # tail check: beyond the cut below the cutoff
    assert paths == {"engine", "plain"}
