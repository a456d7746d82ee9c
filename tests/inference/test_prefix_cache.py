"""The prefix cache: content-hashed blocks, LRU bound in bytes, statistics, no stale hits."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from dota.inference import InferenceEngine
from dota.inference.prefix_cache import ByteLRU, PrefixCache, model_fingerprint

from .helpers import TOL, full_pass, max_rel_diff, phantoms


@dataclass
class Blob:
    nbytes: int


def test_byte_lru_evicts_oldest_and_counts():
    lru = ByteLRU(100)
    assert lru.put("a", Blob(40)) and lru.put("b", Blob(40))
    assert lru.get("a") is not None  # "b" is now the oldest
    assert lru.put("c", Blob(40))
    assert "b" not in lru and "a" in lru and "c" in lru
    assert lru.get("b") is None
    assert not lru.put("huge", Blob(101))
    s = lru.stats()
    assert s == {"entries": 2, "bytes": 80, "max_bytes": 100, "hits": 1, "misses": 1, "evictions": 1, "inserts": 3}
    lru.put("a", Blob(10))  # replacing an entry accounts its new size
    assert lru.bytes == 50
    lru.clear()
    assert len(lru) == 0 and lru.bytes == 0
    with pytest.raises(ValueError):
        ByteLRU(-1)


def test_hash_chain_names_model_energy_and_whole_prefix(tiny, paper):
    cache = PrefixCache(1 << 20, block_slices=10)
    g = phantoms(["heterogeneous"], 1)[0]
    fp = model_fingerprint(tiny)
    keys = cache.chain(fp, 0.5, g, 5)
    assert len(keys) == 5 and len(set(keys)) == 5
    assert cache.chain(fp, 0.5, g.copy(), 5) == keys
    g2 = g.copy()
    g2[25] += 1.0  # inside block 2
    keys2 = cache.chain(fp, 0.5, g2, 5)
    assert keys2[:2] == keys[:2] and all(a != b for a, b in zip(keys2[2:], keys[2:]))
    assert not set(cache.chain(fp, 0.51, g, 5)) & set(keys)
    assert not set(cache.chain(model_fingerprint(paper), 0.5, g, 5)) & set(keys)
    assert fp == model_fingerprint(tiny)


def variants(n: int, shared: int, seed: int = 0) -> np.ndarray:
    """n geometries equal on slices [0, shared), different beyond."""
    g = phantoms(["heterogeneous"] * n, seed)
    g[:, :shared] = g[0, :shared]
    return g


@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_requests_sharing_leading_slices_hit_and_stay_exact(preset, tiny, paper):
    model = {"tiny": tiny, "paper": paper}[preset]
    g = variants(3, shared=70, seed=2)
    e = np.full(3, 215.0, np.float32)  # reaches beyond the shared part
    ref = full_pass(model, g, e)
    engine = InferenceEngine(model, prefix_block_slices=16, verify_tail=False)
    results = [engine.predict_scaled(g[i : i + 1], e[i : i + 1]) for i in range(3)]
    stats = engine.prefix_cache.stats()
    assert stats["hits"] == 2 * (70 // 16)  # the 4 complete shared blocks, for requests 2 and 3
    for i, (out, computed) in enumerate(results):
        assert computed[0] > 70
        assert max_rel_diff(out, ref[i : i + 1], computed) <= TOL
    assert engine.cache_bytes >= stats["bytes"] > 0


def test_no_stale_hit_after_eviction(tiny):
    g = variants(4, shared=64, seed=3)
    e = np.full(4, 200.0, np.float32)
    ref = full_pass(tiny, g, e)
    engine = InferenceEngine(tiny, prefix_block_slices=16, verify_tail=False)
    probe = engine.prefix_cache
    engine.predict_scaled(g[:1], e[:1])
    block_bytes = probe.bytes // len(probe)
    # room for 3 blocks only: every request evicts; the shallow blocks survive (inserted last)
    engine.prefix_cache = PrefixCache(3 * block_bytes + block_bytes // 2, block_slices=16)
    for i in [0, 1, 2, 3, 1]:
        out, computed = engine.predict_scaled(g[i : i + 1], e[i : i + 1])
        assert max_rel_diff(out, ref[i : i + 1], computed) <= TOL
        assert engine.prefix_cache.bytes <= engine.prefix_cache.max_bytes
    stats = engine.prefix_cache.stats()
    assert stats["evictions"] > 0 and stats["hits"] > 0


def test_prefix_cache_is_dropped_when_weights_change(tiny):
    g = variants(2, shared=150, seed=4)[:1]
    e = np.array([190.0], np.float32)
    engine = InferenceEngine(tiny, verify_tail=False)
    engine.predict_scaled(g, e)
    saved = {k: v.clone() for k, v in tiny.state_dict().items()}
    try:
        with torch.no_grad():
            tiny.decoder.out.bias.add_(0.25)
        out, computed = engine.predict_scaled(g, e)
        assert engine.prefix_cache.hits == 0
        assert max_rel_diff(out, full_pass(tiny, g, e), computed) <= TOL
    finally:
        tiny.load_state_dict(saved)


def test_fully_cached_request_flushes_the_end_of_the_block(tiny):
    """Blocks of 15 slices tile all 150: a repeated request is served from the cache alone."""
    g = phantoms(["water"], 5)
    e = np.array([219.0], np.float32)
    engine = InferenceEngine(tiny, prefix_block_slices=15, verify_tail=False)
    first, computed = engine.predict_scaled(g, e)
    assert computed[0] == 150
    again, computed = engine.predict_scaled(g, e)
    assert engine.prefix_cache.hits == 10 and computed[0] == 150
    assert max_rel_diff(again, full_pass(tiny, g, e), computed) <= TOL
