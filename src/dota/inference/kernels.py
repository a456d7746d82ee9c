"""The per-slice encoder and decoder run in chunks, channels-last, optionally compiled.

The arithmetic is the model's own (:class:`dota.model.SliceEncoder`, :class:`dota.model.SliceDecoder`,
including its exact rewrites of the encoder's pooling and the decoder's last convolution); this module
only decides how it is run on a CPU:

* slices are processed in chunks (``chunk_slices``), so temporaries stay small and cache-resident
  and the allocator reuses them (see :mod:`dota.inference.runtime`);
* activations are channels-last (oneDNN's fast layout on x86: 1.3x on the convolutions here);
* ``torch.compile`` of the chunk functions is opt-in (static shapes: the last chunk is zero-padded).

Results equal the model's plain pass up to float32 rounding (checked in ``tests/inference``).
"""

from __future__ import annotations

import torch

from dota.model import DoTA


def weights_signature(model: DoTA) -> tuple:
    """Changes whenever a parameter is replaced or modified in place (optimizer steps, loading)."""
    return tuple((id(p), p.data_ptr(), p._version, p.dtype, p.device) for p in model.parameters())


class SliceCodec:
    """Per-slice encoder and decoder of ``model`` with prepared weights.

    Build a new one when the model's weights change (:func:`weights_signature`).
    """

    def __init__(self, model: DoTA, chunk_slices: int = 32, channels_last: bool = True, compile: bool = False) -> None:
        if chunk_slices < 1:
            raise ValueError(f"chunk_slices must be >= 1, got {chunk_slices}")
        cfg = model.config
        self.chunk = int(chunk_slices)
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format
        _, self.h, self.w = cfg.block_shape
        self.d_model = cfg.d_model
        self.encoder, self.decoder = model.encoder, model.decoder
        self.compiled = bool(compile)
        self._enc, self._dec = self._encode_chunk, self._decode_chunk
        if compile:
            # static shapes: every chunk is padded to chunk_slices, so each function compiles once
            self._enc = torch.compile(self._encode_chunk, dynamic=False)
            self._dec = torch.compile(self._decode_chunk, dynamic=False)

    def _chunks(self, fn, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        for s in range(0, x.shape[0], self.chunk):
            part = x[s : s + self.chunk]
            n = part.shape[0]
            if self.compiled and n < self.chunk:  # slices are independent: zero padding changes nothing
                part = torch.cat([part, part.new_zeros(self.chunk - n, *part.shape[1:])])
            out[s : s + n] = fn(part)[:n]
        return out

    def _encode_chunk(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x, self.fmt)

    def _decode_chunk(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decoder(tokens, self.fmt)

    def encode(self, slices: torch.Tensor) -> torch.Tensor:
        """(n, H, W) scaled geometry slices (or (n, C, H, W) input channels) -> (n, d_model) tokens (no positions)."""
        out = torch.empty(slices.shape[0], self.d_model, dtype=slices.dtype, device=slices.device)
        return self._chunks(self._enc, slices, out)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n, d_model) slice tokens after the transformer -> (n, H, W) scaled dose."""
        out = torch.empty(tokens.shape[0], self.h, self.w, dtype=torch.float32, device=tokens.device)
        return self._chunks(self._dec, tokens, out)


__all__ = ["SliceCodec", "weights_signature"]
