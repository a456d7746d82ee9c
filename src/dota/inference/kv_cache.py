"""Incremental decoding: slices fed in chunks, keys and values kept in a preallocated per-layer cache.

Token i of every block attends to tokens j <= i + num_forward, and the encoder and decoder work per
slice, so a block can be processed front to back: once the first T tokens of a block's input are
known, its output is final for the first T - num_forward of them (all T at the end of the block).
:class:`IncrementalDecoder` keeps, per block, the keys/values of every known input row
(:class:`KVCache`) and the input rows still waiting for look-ahead, and returns dose slices as soon as
they are final. Any chunking gives the plain pass's values (up to float rounding), for any
``num_forward`` and number of blocks.

Streaming is slower than one pass when the whole block is needed (small matrix products per chunk);
use it when the stopping depth is not known in advance, or to resume from a cached prefix
(:mod:`dota.inference.prefix_cache`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dota.inference.kernels import SliceCodec
from dota.model import DoTA


class KVCache:
    """Keys and values of every transformer block, preallocated as (batch, heads, max_len, head_dim).

    The vocabulary of gpt-fast and Hugging Face caches: :meth:`setup_caches` (idempotent),
    :meth:`update`, :meth:`get_seq_length`, :meth:`crop`, :meth:`reset`. Blocks of a look-ahead model
    hold different lengths (a deeper block lags by ``num_forward`` rows), hence per-layer lengths.
    """

    def __init__(self, num_layers: int, num_heads: int, head_dim: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        self.num_layers, self.num_heads, self.head_dim = num_layers, num_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device or "cpu")
        self.max_batch = self.max_len = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.lengths = [0] * num_layers

    def setup_caches(self, max_batch: int, max_len: int) -> None:
        """Allocate room for ``max_batch`` sequences of ``max_len`` tokens; keeps larger existing buffers."""
        if max_batch <= self.max_batch and max_len <= self.max_len:
            return
        self.max_batch, self.max_len = max(max_batch, self.max_batch), max(max_len, self.max_len)
        shape = (self.max_batch, self.num_heads, self.max_len, self.head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self.lengths = [0] * self.num_layers

    def update(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write keys/values (b, heads, t, head_dim) at positions pos..pos+t-1 of ``layer``; return the
        cached keys and values of positions 0..pos+t-1 (views)."""
        b, _, t, _ = k.shape
        if pos > self.lengths[layer]:
            raise ValueError(f"KVCache.update at position {pos} leaves a gap after length {self.lengths[layer]}")
        if b > self.max_batch or pos + t > self.max_len:
            raise ValueError(
                f"KVCache holds {self.max_batch} x {self.max_len}; update needs {b} x {pos + t}: "
                "call setup_caches first"
            )
        self.k[layer][:b, :, pos : pos + t] = k
        self.v[layer][:b, :, pos : pos + t] = v
        self.lengths[layer] = pos + t
        return self.k[layer][:b, :, : pos + t], self.v[layer][:b, :, : pos + t]

    def get_seq_length(self, layer: int = 0) -> int:
        return self.lengths[layer]

    def crop(self, length: int) -> None:
        """Forget positions >= length in every layer."""
        self.lengths = [min(n, length) for n in self.lengths]

    def reset(self) -> None:
        """Forget every position (buffers are kept)."""
        self.lengths = [0] * self.num_layers

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


@dataclass
class LayerRows:
    """Rows of one block's state: keys/values (heads, n, head_dim) and input tokens (n, d) of one sequence."""

    k: torch.Tensor
    v: torch.Tensor
    x: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.x))


class IncrementalDecoder:
    """Runs a :class:`~dota.model.DoTA` model over slices fed in chunks (a batch of sequences in lockstep).

    Usage::

        dec = IncrementalDecoder(model, codec)
        dec.start(energy_scaled)                 # (B,)
        dose = dec.feed(slices_scaled)           # (B, c, H, W) -> (B, c', H, W) newly final dose slices
        ...
        dose = dec.feed(last_slices, final=True) # the end of the block (implied when slice L is fed)
    """

    def __init__(self, model: DoTA, codec: SliceCodec, cache: KVCache | None = None) -> None:
        cfg = model.config
        self.model, self.codec = model, codec
        self.nf, self.num_layers = cfg.num_forward, cfg.num_blocks
        self.num_slices = cfg.block_shape[0]
        self.cache = cache or KVCache(cfg.num_blocks, cfg.num_heads, cfg.head_dim, device=model.device)
        self.x_in: list[torch.Tensor] = []
        self.n_in = [0] * self.num_layers  # rows of each block's input that are known (and cached)
        self.n_out = [0] * self.num_layers  # rows of each block's output that are final
        self.energy: torch.Tensor | None = None

    # -- state ----------------------------------------------------------------------------------
    def start(self, energy: torch.Tensor) -> None:
        """Begin new sequences for scaled energies (B,)."""
        b, t = energy.shape[0], self.num_slices + 1
        d = self.model.config.d_model
        self.cache.setup_caches(b, t)
        self.cache.reset()
        if not self.x_in or self.x_in[0].shape[0] < b:
            self.x_in = [torch.zeros(b, t, d, device=energy.device) for _ in range(self.num_layers)]
        self.n_in = [0] * self.num_layers
        self.n_out = [0] * self.num_layers
        self.energy = energy

    @property
    def batch(self) -> int:
        return 0 if self.energy is None else self.energy.shape[0]

    @property
    def slices_fed(self) -> int:
        return max(0, self.n_in[0] - 1)

    @property
    def slices_done(self) -> int:
        """Dose slices final so far."""
        return max(0, self.n_out[-1] - 1)

    @property
    def finished(self) -> bool:
        return self.n_out[-1] == self.num_slices + 1

    def rows_after(self, tokens: int) -> list[int]:
        """Known input rows of each block after ``tokens`` tokens were fed (not at the end of the block)."""
        return [max(0, tokens - b * self.nf) for b in range(self.num_layers)]

    def export_rows(self, t0: int, t1: int, index: int = 0) -> list[LayerRows]:
        """The state that feeding tokens t0..t1-1 added, for sequence ``index`` (copies)."""
        a, b = self.rows_after(t0), self.rows_after(t1)
        out = []
        for layer in range(self.num_layers):
            if b[layer] > self.n_in[layer]:
                raise ValueError(f"rows up to {b[layer]} of block {layer} are not computed yet")
            sl = slice(a[layer], b[layer])
            out.append(
                LayerRows(
                    k=self.cache.k[layer][index, :, sl].clone(),
                    v=self.cache.v[layer][index, :, sl].clone(),
                    x=self.x_in[layer][index, sl].clone(),
                )
            )
        return out

    def load_rows(self, energy: torch.Tensor, tokens: int, parts: list[list[LayerRows]]) -> None:
        """Restore one sequence's state after its first ``tokens`` tokens from consecutive exports."""
        self.start(energy.reshape(1))
        rows = self.rows_after(tokens)
        for layer in range(self.num_layers):
            k = torch.cat([p[layer].k for p in parts], dim=1)
            v = torch.cat([p[layer].v for p in parts], dim=1)
            x = torch.cat([p[layer].x for p in parts], dim=0)
            if k.shape[1] != rows[layer]:
                raise ValueError(f"block {layer}: {k.shape[1]} cached rows, expected {rows[layer]}")
            self.cache.update(layer, 0, k[None], v[None])
            self.x_in[layer][0, : rows[layer]] = x
            self.n_in[layer] = rows[layer]
        self.n_out = rows[1:] + [max(0, tokens - self.num_layers * self.nf)]

    # -- computation ------------------------------------------------------------------------------
    def feed(self, slices: torch.Tensor, final: bool = False) -> torch.Tensor:
        """Feed the next slices (B, c, H, W), scaled; return the dose slices that became final (B, c', H, W).

        ``final`` marks the end of the input (no later slices will come: the remaining rows are
        computed without them, which equals the plain pass only when slice L - 1 was fed).
        """
        if self.energy is None:
            raise RuntimeError("IncrementalDecoder.feed before start()")
        model = self.model
        b, c = slices.shape[:2]
        if b != self.batch:
            raise ValueError(f"fed {b} sequences, started {self.batch}")
        start = self.n_in[0]
        first_slice = max(0, start - 1)
        if first_slice + c > self.num_slices:
            raise ValueError(f"feeding {c} slices after {first_slice} exceeds the block's {self.num_slices} slices")
        if c:
            x = self.codec.encode(slices.reshape(b * c, *slices.shape[2:])).view(b, c, -1)
        else:
            x = slices.new_zeros(b, 0, model.config.d_model)
        x = x + model.positions[first_slice + 1 : first_slice + 1 + c]
        if start == 0:
            e0 = model.energy_embedding(self.energy) + model.positions[0]
            x = torch.cat([e0.to(x.dtype), x], dim=1)
        final = final or first_slice + c == self.num_slices
        first_row = self.n_out[-1]
        for layer, block in enumerate(model.blocks):
            x = self._block_step(layer, block, x, final)
        if first_row == 0 and x.shape[1]:
            x = x[:, 1:]  # the energy token's row carries no dose
        if x.shape[1] == 0:
            return slices.new_zeros(b, 0, *slices.shape[-2:])
        return self.codec.decode(x.reshape(-1, x.shape[-1])).view(b, x.shape[1], *slices.shape[-2:])

    def _block_step(self, layer: int, block, new_rows: torch.Tensor, final: bool) -> torch.Tensor:
        """Cache the keys/values of a block's new input rows; return its output rows that became final."""
        s, t = self.n_in[layer], new_rows.shape[1]
        b = new_rows.shape[0]
        keys = values = None
        if t:
            self.x_in[layer][:b, s : s + t] = new_rows
            keys, values = self.cache.update(layer, s, *block.keys_values(new_rows))
            self.n_in[layer] = s + t
        n = self.n_in[layer]
        r0 = self.n_out[layer]
        ready = n if final else max(r0, n - self.nf)
        if ready <= r0:
            return new_rows.new_zeros(b, 0, new_rows.shape[-1])
        if keys is None:
            keys, values = self.cache.k[layer][:b, :, :n], self.cache.v[layer][:b, :, :n]
        rows = torch.arange(r0, ready, device=new_rows.device)
        mask = torch.arange(n, device=new_rows.device)[None, :] <= rows[:, None] + self.nf
        out = block.finish(self.x_in[layer][:b, r0:ready], keys, values, mask)
        self.n_out[layer] = ready
        return out


def stream_until_negligible(
    decoder: IncrementalDecoder,
    geometry: torch.Tensor,
    energy: torch.Tensor,
    chunk_slices: int,
    cutoff_fraction: float,
) -> tuple[torch.Tensor, list[int]]:
    """Feed scaled geometry (B, L, H, W) chunk by chunk and stop once every beamlet's dose has fallen
    below ``cutoff_fraction`` of its maximum past the maximum.

    Returns the scaled dose (B, L, H, W), zero from each beamlet's stop slice on, and the number of
    slices returned as computed for each beamlet (the slice where its dose first fell below the
    cutoff behind its peak, or L).
    """
    b, num_slices = geometry.shape[:2]
    out = torch.zeros((*geometry.shape[:2], *geometry.shape[-2:]), dtype=torch.float32, device=geometry.device)
    decoder.start(energy)
    peak = [0.0] * b
    stop: list[int | None] = [None] * b
    done = 0
    while done < num_slices and any(s is None for s in stop):
        fed = decoder.slices_fed
        dose = decoder.feed(geometry[:, fed : fed + chunk_slices])
        c = dose.shape[1]
        if not c:
            continue
        out[:, done : done + c] = dose
        slice_max = dose.clamp_min(0).amax(dim=(2, 3))  # (B, c)
        for i in range(b):
            if stop[i] is not None:
                continue
            for j in range(c):
                m = float(slice_max[i, j])
                if m > peak[i]:
                    peak[i] = m
                elif peak[i] > 0 and m <= cutoff_fraction * peak[i]:
                    stop[i] = done + j
                    break
        done += c
    computed = [num_slices if s is None else s for s in stop]
    for i, s in enumerate(computed):
        out[i, s:] = 0
    return out, computed


__all__ = ["KVCache", "IncrementalDecoder", "LayerRows", "stream_until_negligible"]
