"""The inference engine: decides what to compute for a request; the model computes.

For a batch of beamlets (HU blocks and energies) :meth:`InferenceEngine.predict` returns the plain
full pass's dose, computing only what that dose depends on:

1. **Range-aware truncation** (``truncation="physics"``): dose at depth d depends only on the energy
   and slices 0..d (+ look-ahead), so only the slices a beam can reach are computed:
   :func:`dota.physics.stopping_depth_index` (water-equivalent depth against the beam's analytic
   extent plus ``margin_mm``), plus ``num_blocks * num_forward`` input slices of look-ahead. Slices
   beyond are returned as zero. ``truncation="stream"`` instead feeds slices in chunks and stops
   once the dose has fallen below the cutoff behind its peak; ``"none"`` computes every slice.
2. **Geometry sharing**: beamlets with identical geometry in one request (the energy layers of a spot)
   share the encoder and the energy-independent part of the first block
   (:mod:`dota.inference.geometry_cache`); an LRU keeps those states across requests.
3. **Incremental decoding** with a per-layer K/V cache (:mod:`dota.inference.kv_cache`), used by the
   prefix cache and by ``truncation="stream"``.
4. **Prefix cache** (:mod:`dota.inference.prefix_cache`): single beamlets whose energy and leading
   slices match an earlier request resume from the cached state.
5. **Batching**: requests are grouped by geometry; encoder and decoder run in chunks of slices.
6. **Speed without caching**: inference mode, channels-last convolutions in chunks of slices
   (:mod:`dota.inference.kernels`; the model's own encoder and decoder, with their exact rewrites of
   the pooling and of the last convolution), a tuned
   glibc allocator (:mod:`dota.inference.runtime`); ``torch.compile`` and bf16 are opt-in. Measured
   here, ``torch.compile`` took 184 s to compile and ran 3.6x slower than eager mode (paper preset,
   CPU inductor); it stays available but is not recommended on CPU.

Where each request goes: a geometry that appears once in the request takes the prefix-cache path
(incremental decoder, one pass over the slices it needs, resumed from cached blocks when possible);
a geometry with several energies takes the geometry-sharing path. Both are truncated.

Guarantee (tested in ``tests/inference``): every slice the engine computes equals the plain pass to
float32 rounding (max |difference| <= 1e-5 of the beamlet's maximum; against the model run in float64
the engine is as close as the float32 plain pass). Slices beyond the computed range are zero; whether
the model would have put dose there is a property of the model, checked against physics and reported
separately (``tail_rel`` in :meth:`InferenceEngine.compare_with_full_pass`). Training mode is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from typing import Any

import numpy as np
import torch

from dota.constants import OUTPUT_CUTOFF_FRACTION, TRUNCATION_MARGIN_MM
from dota.errors import InputError
from dota.inference.geometry_cache import GeometryState, PreparedBlock, crop_state, energy_tokens, geometry_state
from dota.inference.kernels import SliceCodec, weights_signature
from dota.inference.kv_cache import IncrementalDecoder, stream_until_negligible
from dota.inference.prefix_cache import ByteLRU, PrefixBlock, PrefixCache, model_fingerprint
from dota.inference.runtime import configure_allocator
from dota.model import DoTA
from dota.validation import check_beamlets

log = logging.getLogger(__name__)

TRUNCATION_MODES = ("physics", "stream", "none")
PATHS = ("auto", "engine", "plain")
PRECISIONS = ("fp32", "bf16")
MIB = 1024 * 1024
#: Decoder input rows gathered before a decode pass (across geometries of one request).
_DECODE_ROWS = 256


class InferenceEngine:
    """Runs a :class:`~dota.model.DoTA` model on HU/MeV input and returns Gy per 1e9 primaries.

    Parameters
    ----------
    model : DoTA
        The model; the engine never changes it. Weight changes (training) are detected and drop
        every cache.
    truncation : {"physics", "stream", "none"}
        How the computed depth is chosen (see the module docstring).
    margin_mm : float
        Water-equivalent safety margin added to the beam's analytic extent (``"physics"``).
    verify_tail : bool
        After a physics truncation, check the last computed slices (the margin, where physics says the
        dose has ended): a beamlet whose dose there is still above ``cutoff_fraction`` of its maximum
        (a model that has not learned where beams stop, e.g. random or under-trained weights) is
        recomputed over every slice, so the output never loses dose the full pass would give. Default
        on; benchmarks of random-weight models turn it off and report the tail separately.
    share_geometry : bool
        Group identical geometries of a request and share their energy-independent work.
    geometry_cache_bytes, prefix_cache_bytes : int
        Byte budgets of the cross-request geometry LRU and of the prefix cache (0 disables).
    prefix_block_slices : int
        Slices per prefix-cache block.
    chunk_slices : int
        Slices per encoder/decoder chunk.
    stream_chunk_slices : int
        Slices per step for ``truncation="stream"``.
    cutoff_fraction : float
        Output cutoff relative to the beamlet maximum (``"stream"`` stops below it).
    precision : {"fp32", "bf16"}
        bf16 runs under CPU autocast (opt-in; not exact: see the benchmark for its error).
    compile : bool
        ``torch.compile`` the per-slice encoder and decoder chunks (opt-in; slower on CPU here).
    channels_last : bool
        Channels-last convolutions.
    path : {"auto", "engine", "plain"}
        What :meth:`predict` runs. ``"engine"``: always the truncated, cached path; ``"plain"``: always
        the model's full pass; ``"auto"`` (default): whichever has been faster for this kind of request
        (:class:`PathChooser`), so the engine is never slower than the plain pass for a model where
        truncation and caching do not pay (a small model, or one whose tail check recomputes most
        beamlets); a model with a range support always takes the engine path (its batched passes over each
        beamlet's support are the plain pass's over fewer slices). Both return the plain pass's dose on every slice the engine computes (the tested bound).
    """

    def __init__(
        self,
        model: DoTA,
        *,
        truncation: str = "physics",
        margin_mm: float = TRUNCATION_MARGIN_MM,
        verify_tail: bool = True,
        share_geometry: bool = True,
        geometry_cache_bytes: int = 128 * MIB,
        prefix_cache_bytes: int = 256 * MIB,
        prefix_block_slices: int = 16,
        chunk_slices: int = 32,
        stream_chunk_slices: int = 16,
        cutoff_fraction: float = OUTPUT_CUTOFF_FRACTION,
        precision: str = "fp32",
        compile: bool = False,
        channels_last: bool = True,
        path: str = "auto",
    ) -> None:
        if truncation not in TRUNCATION_MODES:
            raise InputError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
        if path not in PATHS:
            raise InputError(f"path must be one of {PATHS}, got {path!r}")
        if precision not in PRECISIONS:
            raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if not (np.isfinite(margin_mm) and margin_mm >= 0):
            raise InputError(f"margin_mm must be a finite number >= 0, got {margin_mm!r}")
        if chunk_slices < 1 or stream_chunk_slices < 1 or prefix_block_slices < 1:
            raise InputError("chunk_slices, stream_chunk_slices and prefix_block_slices must be >= 1")
        self.model = model
        self.enabled = True
        self.truncation = truncation
        self.margin_mm = float(margin_mm)
        self.verify_tail = bool(verify_tail)
        self.share_geometry = bool(share_geometry)
        self.chunk_slices = int(chunk_slices)
        self.stream_chunk_slices = int(stream_chunk_slices)
        self.cutoff_fraction = float(cutoff_fraction)
        self.precision = precision
        self.compile = bool(compile)
        self.channels_last = bool(channels_last)
        self.geometry_cache = ByteLRU(geometry_cache_bytes)
        self.prefix_cache = PrefixCache(prefix_cache_bytes, prefix_block_slices) if prefix_cache_bytes > 0 else None
        self.last_stats: dict[str, Any] = {}
        self.path = path
        self.chooser = PathChooser()
        self._signature: tuple | None = None
        self._fingerprint: bytes | None = None
        self._codec: SliceCodec | None = None
        self._blocks: list[PreparedBlock] = []
        self._decoder: IncrementalDecoder | None = None
        self._physics_missing_logged = False

    # -- state ------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Drop every cached geometry and prefix (buffers of the K/V cache are kept)."""
        self.geometry_cache.clear()
        if self.prefix_cache is not None:
            self.prefix_cache.clear()

    def cache_stats(self) -> dict[str, Any]:
        """Entries, bytes, hits and misses of the caches, and the K/V buffers' size."""
        return {
            "geometry_cache": self.geometry_cache.stats(),
            "prefix_cache": None if self.prefix_cache is None else self.prefix_cache.stats(),
            "kv_buffer_bytes": 0 if self._decoder is None else self._decoder.cache.nbytes,
        }

    @property
    def cache_bytes(self) -> int:
        stats = self.cache_stats()
        prefix = stats["prefix_cache"]["bytes"] if stats["prefix_cache"] else 0
        return stats["geometry_cache"]["bytes"] + prefix + stats["kv_buffer_bytes"]

    def _refresh(self) -> None:
        """(Re)build prepared weights when the model's weights changed; such a change drops every cache."""
        signature = weights_signature(self.model)
        if signature == self._signature:
            return
        if self._signature is not None:
            self.reset()
        with torch.no_grad():
            codec = SliceCodec(self.model, self.chunk_slices, channels_last=self.channels_last, compile=self.compile)
            self._codec = codec
            self._blocks = [PreparedBlock(b) for b in self.model.blocks]
        self._decoder = IncrementalDecoder(self.model, codec)
        self._fingerprint = None
        self._signature = signature

    def _precision(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.model.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _check_mode(self) -> None:
        if self.model.training:
            raise RuntimeError("the inference engine runs models in eval mode only: call model.eval() first")

    # -- what to compute ----------------------------------------------------------------------------
    def required_slices(self, geometry_hu: np.ndarray, energies_mev: np.ndarray) -> np.ndarray:
        """Dose slices [0, s) to compute for each beamlet (N,); all L unless ``truncation="physics"``."""
        num_slices = self.model.config.block_shape[0]
        n = geometry_hu.shape[0]
        if self.truncation != "physics":
            return np.full(n, num_slices, dtype=np.int64)
        try:
            from dota.physics import stopping_depth_index
        except ImportError:
            if not self._physics_missing_logged:
                log.warning("dota.physics is not available: computing every slice")
                self._physics_missing_logged = True
            return np.full(n, num_slices, dtype=np.int64)
        s = stopping_depth_index(
            geometry_hu, energies_mev, voxel_mm=self.model.config.voxel_mm, margin_mm=self.margin_mm
        )
        return np.clip(np.asarray(s, dtype=np.int64), 1, num_slices)

    # -- public entry points ------------------------------------------------------------------------
    @torch.inference_mode()
    def predict(self, geometry_hu: Any, energies_mev: Any, batch_size: int = 16, clip: bool = True) -> np.ndarray:
        """Dose (N, L, H, W) float32 in Gy per 1e9 primaries for HU blocks (N, L, H, W) and energies (N,) MeV;
        ``clip=False`` keeps the network's small negative values where the dose is about zero (for sums)."""
        self._check_mode()
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        model = self.model
        t0 = time.perf_counter()
        geometry, energies, g, e, base = self._inputs(geometry_hu, energies_mev)
        which = "plain" if not self.enabled else self.path
        key = digests = None
        if which != "plain":
            digests = geometry_digests(geometry)  # once per request: the chooser and the grouping use them
        if which == "auto" and model.config.support_fraction:
            which = "engine"  # the plain pass's own batches over fewer slices: never slower, nothing to measure
        if which == "auto":
            key = self.chooser.key(digests)
            which = self.chooser.choose(key)
        support = model.support_slices(base)
        if which == "engine":
            out, _ = self._run(geometry, energies, g, e, batch_size, base=base, digests=digests, support=support)
        else:
            out = self._plain(g, e, batch_size, support)
            self.last_stats = {"beamlets": len(energies), "truncation": "none", "recomputed": 0,
                               "computed": np.full(len(energies), g.shape[1], dtype=np.int64),
                               "computed_fraction": 1.0}
        self.last_stats["path"] = which
        if key is not None:
            self.chooser.record(key, which, (time.perf_counter() - t0) / max(1, len(energies)))
        if base is not None:
            out = _zero_beyond(out + base, support)
        out = model.normalization.unscale_dose(out)
        return (out.clamp_min_(0) if clip else out).cpu().numpy()

    @torch.inference_mode()
    def predict_scaled(
        self, geometry_hu: Any, energies_mev: Any, batch_size: int = 16
    ) -> tuple[torch.Tensor, np.ndarray]:
        """The network's scaled output before clamping (N, L, H, W) and the slices computed per beamlet (N,)
        (for a model with a base engine: the correction, without the base dose)."""
        self._check_mode()
        geometry, energies, g, e, base = self._inputs(geometry_hu, energies_mev)
        return self._run(geometry, energies, g, e, batch_size, base=base, support=self.model.support_slices(base))

    @torch.inference_mode()
    def compare_with_full_pass(self, geometry_hu: Any, energies_mev: Any, batch_size: int = 16) -> dict[str, float]:
        """Run the engine (cold caches) and the plain full pass on the same beamlets.

        Returns ``max_abs_diff_rel`` (largest |engine - plain| over the computed slices, relative to
        each beamlet's maximum), ``tail_rel`` (largest dose the plain pass puts beyond the computed
        slices, same scale), ``computed_fraction``, and ``engine_ms`` / ``baseline_ms`` per beamlet.
        Caches are cleared before and after, so the check leaves no state behind.
        """
        self._check_mode()
        model = self.model
        geometry, energies, g, e, base = self._inputs(geometry_hu, energies_mev)  # the same for both: not timed
        n = max(1, g.shape[0])
        support = model.support_slices(base)
        t0 = time.perf_counter()
        ref = self._plain(g, e, batch_size, support)
        t1 = time.perf_counter()
        self.reset()
        out, computed = self._run(geometry, energies, g, e, batch_size, base=base, support=support)
        t2 = time.perf_counter()
        self.reset()
        diff, tail = exactness(out, ref, computed)
        return {
            "max_abs_diff_rel": diff,
            "tail_rel": tail,
            "computed_fraction": float(np.sum(computed) / (n * model.config.block_shape[0])),
            "baseline_ms": (t1 - t0) * 1e3 / n,
            "engine_ms": (t2 - t1) * 1e3 / n,
        }

    # -- paths ---------------------------------------------------------------------------------------
    def _inputs(
        self, geometry_hu: Any, energies_mev: Any
    ) -> tuple[np.ndarray, np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Validated HU and MeV arrays, the network input (scaled geometry, with the scaled base dose as a
        second channel for a model with ``base_input``), the scaled energies and the scaled base dose."""
        model = self.model
        geometry, energies = check_beamlets(
            geometry_hu, energies_mev, block_shape=model.config.block_shape,
            energy_range_mev=model.normalization.energy_range_mev,
        )
        norm, device = model.normalization, model.device
        g = norm.scale_geometry(torch.from_numpy(geometry).to(device))
        e = norm.scale_energy(torch.from_numpy(energies).to(device))
        base = model.base_dose_scaled(geometry, energies)
        return geometry, energies, model.network_input(g, base), e, base

    def _plain(self, g: torch.Tensor, e: torch.Tensor, batch_size: int, support: np.ndarray | None = None) -> torch.Tensor:
        """The model's own full forward pass, in batches: the reference (zero beyond a model's range
        ``support``, :meth:`dota.model.DoTA.support_slices`)."""
        configure_allocator()
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        out = torch.empty(_dose_shape(g), dtype=g.dtype, device=g.device)
        for s in range(0, g.shape[0], batch_size):
            out[s : s + batch_size] = self.model(g[s : s + batch_size], e[s : s + batch_size], fmt)
        return _zero_beyond(out, support)

    def _prefix_batches(self, g: torch.Tensor, e: torch.Tensor, idx: list[int], needed: np.ndarray,
                        out: torch.Tensor, batch_size: int) -> None:
        """The model's own forward pass over only the slices each beamlet needs (plus the look-ahead), in
        batches of beamlets sorted by that length: exact by causality (slice ``d`` depends on slices
        ``0 .. d + num_blocks * num_forward`` only). Fills ``out[i, :needed[i]]``."""
        cfg = self.model.config
        lag = cfg.num_blocks * cfg.num_forward
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        order = sorted(idx, key=lambda i: int(needed[i]))
        for s in range(0, len(order), batch_size):
            rows = order[s : s + batch_size]
            k = max(int(needed[i]) for i in rows)
            length = min(g.shape[1], k + lag)
            dose = self.model(g[rows, :length], e[rows], fmt)
            for j, i in enumerate(rows):
                out[i, : int(needed[i])] = dose[j, : int(needed[i])]

    def _run(
        self, geometry: np.ndarray, energies: np.ndarray, g: torch.Tensor, e: torch.Tensor, batch_size: int,
        base: torch.Tensor | None = None, digests: list[bytes] | None = None, support: np.ndarray | None = None,
    ) -> tuple[torch.Tensor, np.ndarray]:
        configure_allocator()
        self._refresh()
        n, num_slices = g.shape[:2]
        if digests is None:
            digests = geometry_digests(geometry)
        stats: dict[str, Any] = {"beamlets": n, "truncation": self.truncation}
        with self._precision():
            if self.truncation == "stream":
                out = torch.zeros(_dose_shape(g), dtype=torch.float32, device=g.device)
                computed = np.zeros(n, dtype=np.int64)
                for s in range(0, n, batch_size):
                    dose, done = stream_until_negligible(
                        self._decoder, g[s : s + batch_size], e[s : s + batch_size],
                        self.stream_chunk_slices, self.cutoff_fraction,
                    )
                    out[s : s + batch_size] = dose
                    computed[s : s + batch_size] = done
            else:
                # a model's range support bounds its dose by construction (tighter than the physics rule, whose
                # analytic dose lies inside it); otherwise the physics rule, checked in its margin below
                needed = self.required_slices(geometry, energies) if support is None else support.copy()
                out, computed = self._run_grouped(geometry, g, e, needed, stats, digests, batch_size,
                                                  prefix_batches=support is not None)
                check = self.verify_tail and support is None  # computed to its support: nothing beyond to check
                redo = self._unverified(out, computed, base) if check else np.zeros(0, np.int64)
                if redo.size:
                    full = np.full(redo.size, num_slices, dtype=np.int64)
                    redone, _ = self._run_grouped(geometry[redo], g[redo], e[redo], full, {},
                                                  [digests[i] for i in redo])
                    out[redo] = redone
                    computed[redo] = num_slices
                stats["recomputed"] = int(redo.size)
            if support is not None:  # the model's dose ends at its support, whatever path computed it
                out = _zero_beyond(out, support)
                computed = np.minimum(computed, support)
        stats["computed"] = computed
        stats["computed_fraction"] = float(computed.sum() / max(1, n * num_slices))
        self.last_stats = stats
        return out, computed

    def _unverified(self, out: torch.Tensor, computed: np.ndarray, base: torch.Tensor | None = None) -> np.ndarray:
        """Indices of truncated beamlets whose dose in the margin slices (the last ones computed) is
        still above the cutoff: the truncation cannot be trusted for them. For a model with a base
        engine, the network's correction there is compared with the maximum of the total dose."""
        num_slices = out.shape[1]
        window = max(1, int(np.ceil(self.margin_mm / float(self.model.config.voxel_mm[0]))))
        bad = []
        for i in np.flatnonzero(computed < num_slices):
            k = int(computed[i])
            total = out[i, :k] if base is None else out[i, :k] + base[i, :k]
            peak = float(total.abs().max())
            tail = float(out[i, max(0, k - window) : k].abs().max())
            if tail > self.cutoff_fraction * max(peak, 1e-30):
                bad.append(i)
        return np.asarray(bad, dtype=np.int64)

    def _groups(self, digests: list[bytes], e: torch.Tensor) -> tuple[list[list[int]], list[bytes]]:
        """Beamlets grouped by what their encoder input depends on: the geometry (its digest), and for a model
        that takes the base dose as an input also the energy (then only identical beamlets share work).
        Returns the groups and each beamlet's key."""
        keys = list(digests)
        if self.model.config.base_input:
            keys = [hashlib.sha256(d + np.float32(e[i].item()).tobytes()).digest()[:16] for i, d in enumerate(keys)]
        if not self.share_geometry:
            return [[i] for i in range(len(keys))], keys
        groups: dict[bytes, list[int]] = {}
        for i, d in enumerate(keys):
            groups.setdefault(d, []).append(i)
        return list(groups.values()), keys

    def _run_grouped(
        self, geometry: np.ndarray, g: torch.Tensor, e: torch.Tensor, needed: np.ndarray, stats: dict[str, Any],
        digests: list[bytes], batch_size: int = 16, prefix_batches: bool = False,
    ) -> tuple[torch.Tensor, np.ndarray]:
        """Beamlets by group: shared geometries through the geometry-sharing path; single ones through the
        prefix cache, or (``prefix_batches``: a model with a range support, whose beamlets rarely repeat)
        through batched forward passes over the slices they need."""
        cfg = self.model.config
        num_slices = cfg.block_shape[0]
        lag = cfg.num_blocks * cfg.num_forward
        out = torch.zeros(_dose_shape(g), dtype=torch.float32, device=g.device)
        computed = needed.copy()
        groups, digests = self._groups(digests, e)
        stats["groups"] = len(groups)
        queue: list[tuple[torch.Tensor, list[int], list[int]]] = []
        queued = 0
        singles = [idx[0] for idx in groups if len(idx) == 1] if prefix_batches else []
        if singles:
            self._prefix_batches(g, e, singles, needed, out, batch_size)
            groups = [idx for idx in groups if len(idx) > 1]
        for idx in groups:
            if len(idx) == 1 and self.prefix_cache is not None:
                i = idx[0]
                out[i], computed[i] = self._run_prefix(geometry[i], g[i], e[i], int(needed[i]))
                continue
            ks = [int(needed[i]) for i in idx]
            length = min(num_slices, max(ks) + lag)
            state = self._geometry_state(digests[idx[0]], g[idx[0]], length)
            tokens = energy_tokens(self.model, self._blocks, state, e[idx], ks)
            queue.append((tokens, idx, ks))
            queued += tokens.shape[0]
            if queued >= _DECODE_ROWS:
                self._decode_queue(queue, out)
                queue, queued = [], 0
        self._decode_queue(queue, out)
        return out, computed

    def _decode_queue(self, queue: list[tuple[torch.Tensor, list[int], list[int]]], out: torch.Tensor) -> None:
        if not queue:
            return
        dose = self._codec.decode(torch.cat([q[0] for q in queue]).float())
        row = 0
        for _, idx, ks in queue:
            for i, k in zip(idx, ks):
                out[i, :k] = dose[row : row + k]
                row += k

    def _geometry_state(self, digest: bytes, geometry: torch.Tensor, length: int) -> GeometryState:
        cached: GeometryState | None = self.geometry_cache.get(digest) if self.geometry_cache.max_bytes else None
        if cached is not None and cached.length >= length:
            return crop_state(cached, length)
        state = geometry_state(self.model, self._blocks[0], self._codec, geometry[:length])
        if self.geometry_cache.max_bytes:
            self.geometry_cache.put(digest, state)
        return state

    def _run_prefix(
        self, geometry: np.ndarray, g: torch.Tensor, e: torch.Tensor, needed: int
    ) -> tuple[torch.Tensor, int]:
        """One beamlet through the incremental decoder, resuming from and filling the prefix cache."""
        cfg = self.model.config
        num_slices = cfg.block_shape[0]
        lag = cfg.num_blocks * cfg.num_forward
        cache, dec = self.prefix_cache, self._decoder
        bs = cache.block_slices
        length = min(num_slices, needed + lag)
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        keys = cache.chain(self._fingerprint, float(e), geometry, length // bs)
        found = cache.longest_prefix(keys)
        out = torch.zeros((g.shape[0], *g.shape[-2:]), dtype=torch.float32, device=g.device)
        if found:
            dec.load_rows(e, len(found) * bs + 1, [f.layers for f in found])
            prefix = torch.cat([f.dose for f in found])
            out[: prefix.shape[0]] = prefix
        else:
            dec.start(e.reshape(1))
        fed = len(found) * bs
        if fed < length or (length == num_slices and not dec.finished):
            done = dec.slices_done
            new = dec.feed(g[None, fed:length], final=length == num_slices)
            out[done : done + new.shape[1]] = new[0]
        # deepest block first: the LRU then evicts deep blocks before the shallow ones every prefix needs
        for j in reversed(range(len(found), len(keys))):
            t0, t1 = (0 if j == 0 else j * bs + 1), (j + 1) * bs + 1
            d0, d1 = max(0, t0 - lag - 1), max(0, t1 - lag - 1)
            cache.put(keys[j], PrefixBlock(dec.export_rows(t0, t1), out[d0:d1].clone()))
        return out, dec.slices_done


class PathChooser:
    """Picks the faster of the engine path and the plain pass, per kind of request, from measurements.

    A request's kind is whether some of its beamlets share a geometry (energy layers of a spot) and the
    power of two of its size. For each kind the engine path runs first (twice: the first call pays
    one-time costs), then the plain pass (twice); from then on the faster one by its best recent time
    per beamlet, re-measuring the other every ``probe_every`` requests so a change (warm caches, a
    model that learned where beams stop) is noticed.
    """

    def __init__(self, probe_every: int = 32, samples: int = 2, keep: int = 5) -> None:
        self.probe_every, self.samples, self.keep = int(probe_every), int(samples), int(keep)
        self.times: dict[tuple, dict[str, list[float]]] = {}
        self.calls: dict[tuple, int] = {}

    @staticmethod
    def key(digests: list[bytes]) -> tuple[str, int]:
        """The kind of a request from its beamlets' :func:`geometry_digests`."""
        n = len(digests)
        shared = len(set(digests)) < n
        return ("shared" if shared else "distinct", int(np.ceil(np.log2(max(1, n)))))

    def choose(self, key: tuple) -> str:
        t = self.times.setdefault(key, {"engine": [], "plain": []})
        count = self.calls.get(key, 0)
        self.calls[key] = count + 1
        for path in ("engine", "plain"):
            if len(t[path]) < self.samples:
                return path
        best = min(("engine", "plain"), key=lambda p: min(t[p]))
        if count % self.probe_every == 0:
            return "plain" if best == "engine" else "engine"
        return best

    def record(self, key: tuple, path: str, seconds_per_beamlet: float) -> None:
        samples = self.times.setdefault(key, {"engine": [], "plain": []})[path]
        samples.append(float(seconds_per_beamlet))
        del samples[: -self.keep]

    def decisions(self) -> dict[str, str]:
        """The path each kind of request takes now, with the best time per beamlet of both (ms)."""
        out = {}
        for key, t in self.times.items():
            if t["engine"] and t["plain"]:
                e, p = min(t["engine"]) * 1e3, min(t["plain"]) * 1e3
                out[f"{key[0]}, up to {2 ** key[1]} beamlets"] = (
                    f"{'engine' if e <= p else 'plain'} (engine {e:.1f} ms, plain {p:.1f} ms per beamlet)")
        return out


def geometry_digests(geometry: np.ndarray) -> list[bytes]:
    """A 16-byte SHA-256 digest of each beamlet's HU block (N, L, H, W): equal blocks, equal digests."""
    return [hashlib.sha256(np.ascontiguousarray(block).data).digest()[:16] for block in geometry]


def _zero_beyond(dose: torch.Tensor, support: np.ndarray | None) -> torch.Tensor:
    """``dose`` (N, L, H, W) with slices ``support[i]`` and beyond of beamlet ``i`` set to zero (in place)."""
    if support is not None:
        for i in np.flatnonzero(support < dose.shape[1]):
            dose[i, int(support[i]):] = 0
    return dose


def _dose_shape(x: torch.Tensor) -> tuple[int, ...]:
    """(N, L, H, W) for network input (N, L, H, W) or (N, L, C, H, W)."""
    return (*x.shape[:2], *x.shape[-2:])


def exactness(out: torch.Tensor, ref: torch.Tensor, computed: np.ndarray) -> tuple[float, float]:
    """(max |out - ref| over the computed slices, max of ``ref`` beyond them), each relative to the
    beamlet's maximum.

    The difference is taken before clamping (stricter than the clamped dose users see) and relative
    to max |ref|; the tail is the dose :meth:`InferenceEngine.predict` would have returned there
    (negative values count as zero), relative to the clamped maximum.
    """
    diff = tail = 0.0
    ref, out = ref.float(), out.float()
    for i, k in enumerate(np.asarray(computed).tolist()):
        scale = float(ref[i].abs().max())
        if scale > 0 and k > 0:
            diff = max(diff, float((out[i, :k] - ref[i, :k]).abs().max()) / scale)
        peak = float(ref[i].max())
        if peak > 0 and k < ref.shape[1]:
            tail = max(tail, float(ref[i, k:].max()) / peak)
    return diff, tail


__all__ = ["InferenceEngine", "PathChooser", "exactness", "geometry_digests", "TRUNCATION_MODES", "PRECISIONS", "PATHS"]
