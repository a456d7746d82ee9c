"""The K/V cache and incremental decoding against the plain full pass."""

import numpy as np
import pytest
import torch

from dota.inference.kernels import SliceCodec
from dota.inference.kv_cache import IncrementalDecoder, KVCache, stream_until_negligible

from .helpers import TOL, full_pass, phantoms


def scaled(model, g, e):
    norm = model.normalization
    return norm.scale_geometry(torch.from_numpy(g)), norm.scale_energy(torch.from_numpy(e))


def test_kv_cache_api():
    cache = KVCache(num_layers=2, num_heads=3, head_dim=4)
    cache.setup_caches(max_batch=2, max_len=10)
    buf = cache.k[0]
    cache.setup_caches(max_batch=1, max_len=5)  # idempotent: smaller request keeps the buffers
    assert cache.k[0] is buf
    k = torch.randn(2, 3, 6, 4)
    keys, values = cache.update(0, 0, k, k + 1)
    assert keys.shape == (2, 3, 6, 4) and torch.equal(keys, k) and torch.equal(values, k + 1)
    keys, _ = cache.update(0, 6, k[:, :, :2], k[:, :, :2])
    assert cache.get_seq_length(0) == 8 and cache.get_seq_length(1) == 0
    assert torch.equal(keys[:, :, 6:], k[:, :, :2])
    cache.crop(3)
    assert cache.get_seq_length(0) == 3
    with pytest.raises(ValueError, match="gap"):
        cache.update(0, 5, k[:, :, :1], k[:, :, :1])
    with pytest.raises(ValueError, match="setup_caches"):
        cache.update(0, 3, torch.randn(2, 3, 8, 4), torch.randn(2, 3, 8, 4))
    cache.reset()
    assert cache.get_seq_length(0) == 0
    assert cache.nbytes == 2 * 2 * (2 * 3 * 10 * 4) * 4


@pytest.mark.parametrize("chunks", [[150], [1, 2, 3, 144], [7] * 21 + [3], [40, 0, 60, 50]])
def test_chunked_decoding_equals_full_pass_lookahead(tiny, chunks):
    g = phantoms(["heterogeneous", "lung"], 7)
    e = np.array([120.0, 200.0], np.float32)
    ref = full_pass(tiny, g, e)
    gs, es = scaled(tiny, g, e)
    dec = IncrementalDecoder(tiny, SliceCodec(tiny, chunk_slices=9))
    with torch.inference_mode():
        dec.start(es)
        pieces, fed = [], 0
        for c in chunks:
            pieces.append(dec.feed(gs[:, fed : fed + c]))
            fed += c
            assert dec.slices_done == max(0, fed - 2 * 2) or fed == 150  # two blocks of look-ahead 2
        out = torch.cat(pieces, dim=1)
    assert dec.finished and out.shape == ref.shape
    assert float((out - ref).abs().max() / ref.abs().max()) <= TOL


def test_chunked_decoding_paper(paper):
    g = phantoms(["bone"], 8)
    e = np.array([180.0], np.float32)
    ref = full_pass(paper, g, e)
    gs, es = scaled(paper, g, e)
    dec = IncrementalDecoder(paper, SliceCodec(paper))
    with torch.inference_mode():
        dec.start(es)
        out = torch.cat([dec.feed(gs[:, :37]), dec.feed(gs[:, 37:100]), dec.feed(gs[:, 100:])], dim=1)
    assert float((out - ref).abs().max() / ref.abs().max()) <= TOL


def test_export_and_resume(tiny):
    """A state exported after 60 slices and restored elsewhere continues exactly."""
    g = phantoms(["slab"], 9)
    e = np.array([150.0], np.float32)
    ref = full_pass(tiny, g, e)
    gs, es = scaled(tiny, g, e)
    codec = SliceCodec(tiny)
    with torch.inference_mode():
        a = IncrementalDecoder(tiny, codec)
        a.start(es)
        head = a.feed(gs[:, :60])
        parts = [a.export_rows(0, 31), a.export_rows(31, 61)]  # tokens: energy + 60 slices
        b = IncrementalDecoder(tiny, codec)
        b.load_rows(es[0], 61, parts)
        assert b.slices_done == a.slices_done == 60 - 4
        tail = b.feed(gs[:, 60:])
    out = torch.cat([head, tail], dim=1)
    assert float((out - ref).abs().max() / ref.abs().max()) <= TOL
    with pytest.raises(ValueError, match="not computed"):
        a.export_rows(61, 80)


class ScriptedDecoder:
    """Stands in for IncrementalDecoder: returns a given depth-dose curve, chunk by chunk."""

    def __init__(self, curves: np.ndarray) -> None:
        self.curves = torch.from_numpy(curves).float()
        self.fed = 0

    def start(self, energy):
        self.fed = 0

    @property
    def slices_fed(self):
        return self.fed

    def feed(self, slices, final=False):
        c = slices.shape[1]
        out = self.curves[:, self.fed : self.fed + c, None, None].expand(-1, -1, 2, 2)
        self.fed += c
        return out


def test_stream_stops_once_dose_fell_below_cutoff_behind_the_peak():
    z = np.arange(60, dtype=float)
    bragg = np.where(z < 30, 0.3 + z / 40, 0.0) + np.exp(-0.5 * ((z - 30) / 2) ** 2)  # peak at 30, then falls
    bragg[40:] = 1e-9
    rising = 1.0 + z  # never falls: computed to the end
    geometry = torch.zeros(2, 60, 2, 2)
    dec = ScriptedDecoder(bragg[None])
    out, computed = stream_until_negligible(dec, geometry[:1], torch.zeros(1), chunk_slices=8, cutoff_fraction=1e-6)
    assert computed == [40] and dec.fed == 48  # stopped after the chunk holding slice 40
    assert (out[0, 40:] == 0).all() and float(out[0, 39, 0, 0]) > 0
    dec = ScriptedDecoder(np.stack([bragg, rising]))
    out, computed = stream_until_negligible(dec, geometry, torch.zeros(2), chunk_slices=8, cutoff_fraction=1e-6)
    assert computed == [40, 60] and dec.fed == 60
    assert torch.equal(out[1, :, 0, 0], torch.from_numpy(rising).float())
