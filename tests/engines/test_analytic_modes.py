"""The analytic engine called from inference mode and outside it, and from two threads at once (plans run
their engine calls in worker threads, :mod:`dota.plan.dose`): the same doses."""

import threading

import numpy as np
import torch

from dota.engines import get_engine
from dota.physics.phantoms import make_phantom


def _blocks():
    rng = np.random.default_rng(0)
    g = np.stack([make_phantom(k, rng=rng) for k in ("heterogeneous", "lung", "bone", "slab")]).astype(np.float32)
    return g, np.array([90.0, 130.0, 170.0, 210.0], np.float32)


def test_inference_mode_and_plain_calls_give_the_same_dose():
    g, e = _blocks()
    engine = get_engine("analytic")
    with torch.inference_mode():
        inside = engine.dose(g, e)
    outside = engine.dose(g, e)  # the thread's workspace was made in inference mode: must still work here
    np.testing.assert_array_equal(inside, outside)


def test_two_threads_on_one_engine_give_the_sequential_dose():
    g, e = _blocks()
    engine = get_engine("analytic")
    assert engine.concurrent
    ref = engine.dose(g, e)
    out: dict[int, np.ndarray] = {}
    threads = [threading.Thread(target=lambda k=k: out.__setitem__(k, engine.dose(g[::-1] if k else g,
                                                                              e[::-1] if k else e)))
               for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    np.testing.assert_array_equal(out[0], ref)
    np.testing.assert_array_equal(out[1], ref[::-1])
