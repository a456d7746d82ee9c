"""Exact, faster evaluation of DoTA's per-slice encoder and decoder.

The same mathematics as :class:`dota.model.SliceEncoder` / :class:`dota.model.SliceDecoder`, arranged
for a CPU:

* slices are processed in chunks (``chunk_slices``), so temporaries stay small and cache-resident
  and the allocator reuses them (see :mod:`dota.inference.runtime`);
* convolutions run channels-last (oneDNN's fast layout on x86);
* the encoder's 2x2 max pooling is two maxima of strided views (torch's pooling is slow on the NCHW
  output that a convolution of a single-channel input gives);
* the decoder's last convolution (64 channels -> 1) is rewritten: a 1x1 product of the activations
  with the kernel's 25 taps, then a shift-and-add of the 25 tap planes (zero padding by clipping). The
  library pads the single output channel to a full vector width and runs that conv at a fraction of
  peak; the rewrite is the same sum in another order.

Measured on this project's 2-core machine (paper preset, one thread, CPU time per 150 slices): encoder
70 -> 33 ms, decoder 67 -> 40 ms.

Results equal the model's modules up to float32 rounding (checked in ``tests/inference``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dota.model import DoTA


def weights_signature(model: DoTA) -> tuple:
    """Changes whenever a parameter is replaced or modified in place (optimizer steps, loading)."""
    return tuple((id(p), p.data_ptr(), p._version, p.dtype, p.device) for p in model.parameters())


def _max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)`` for even H and W."""
    rows = torch.maximum(x[:, :, 0::2], x[:, :, 1::2])
    return torch.maximum(rows[..., 0::2], rows[..., 1::2])


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
        self.pad = cfg.kernel_size // 2
        self.k = cfg.kernel_size
        _, self.h, self.w = cfg.block_shape
        self.d_model = cfg.d_model
        enc, dec = model.encoder, model.decoder
        with torch.no_grad():
            prep = lambda w: w.detach().contiguous(memory_format=self.fmt)  # noqa: E731
            self.enc_w = [prep(enc.conv1.weight), prep(enc.conv2.weight), prep(enc.conv3.weight)]
            self.enc_norm = [
                (m.num_groups, m.weight.detach(), m.bias.detach(), m.eps) for m in (enc.norm1, enc.norm2, enc.norm3)
            ]
            self.up = [(prep(dec.up1.weight), dec.up1.bias.detach()), (prep(dec.up2.weight), dec.up2.bias.detach())]
            self.dec_norm = [
                None if m is None else (m.num_groups, m.weight.detach(), m.bias.detach(), m.eps)
                for m in (dec.norm1, dec.norm2)
            ]
            c_in = dec.out.weight.shape[1]
            # (taps, channels): row ky*k + kx holds the kernel's weights for that tap
            self.out_taps = dec.out.weight.detach()[0].permute(1, 2, 0).reshape(self.k * self.k, c_in).contiguous()
            self.out_bias = dec.out.bias.detach()
        self.grid = dec.grid
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

    # -- encoder ------------------------------------------------------------------------------
    def _encode_chunk(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:  # (n, H, W) geometry only; (n, C, H, W) with the base dose as a channel
            x = x.unsqueeze(1)
        for i, w in enumerate(self.enc_w):
            g, gw, gb, eps = self.enc_norm[i]
            x = F.group_norm(F.conv2d(x, w, None, padding=self.pad), g, gw, gb, eps)
            if i < 2:
                # 2x2 max pooling as two maxima of strided views: fast in any layout (torch's max_pool2d
                # is slow on the NCHW output a single-channel input conv gives); then channels-last
                x = _max_pool_2x2(x).contiguous(memory_format=self.fmt)
            x = F.relu_(x)
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)

    def encode(self, slices: torch.Tensor) -> torch.Tensor:
        """(n, H, W) scaled geometry slices (or (n, C, H, W) input channels) -> (n, d_model) tokens (no positions)."""
        out = torch.empty(slices.shape[0], self.d_model, dtype=slices.dtype, device=slices.device)
        return self._chunks(self._enc, slices, out)

    # -- decoder ------------------------------------------------------------------------------
    def _output_conv(self, x: torch.Tensor) -> torch.Tensor:
        """The final C -> 1 convolution: taps x channels product, then shift-and-add of the tap planes."""
        n, c, h, w = x.shape
        p, k = self.pad, self.k
        flat = x.permute(0, 2, 3, 1).reshape(-1, c)  # a view for channels-last input
        z = torch.mm(self.out_taps.to(flat.dtype), flat.t()).view(k * k, n, h, w)  # one plane per tap
        centre = p * k + p
        out = z[centre] + self.out_bias.to(z.dtype)
        for tap in range(k * k):
            if tap == centre:
                continue
            dy, dx = tap // k - p, tap % k - p
            # out[i, j] += z[tap, i + dy, j + dx] wherever that lies inside the slice (zero padding)
            out[:, max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)] += z[
                tap, :, max(0, dy) : h + min(0, dy), max(0, dx) : w + min(0, dx)
            ]
        return out

    def _decode_chunk(self, tokens: torch.Tensor) -> torch.Tensor:
        h, w, c = self.grid
        x = tokens.reshape(-1, h, w, c).permute(0, 3, 1, 2)
        if self.fmt is torch.contiguous_format:
            x = x.contiguous()
        for (uw, ub), norm in zip(self.up, self.dec_norm):
            x = F.conv_transpose2d(x, uw, ub, stride=2, padding=self.pad, output_padding=1)
            x = F.relu_(x if norm is None else F.group_norm(x, *norm))
        return self._output_conv(x.contiguous(memory_format=torch.channels_last))

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n, d_model) slice tokens after the transformer -> (n, H, W) scaled dose."""
        out = torch.empty(tokens.shape[0], self.h, self.w, dtype=torch.float32, device=tokens.device)
        return self._chunks(self._dec, tokens, out)


__all__ = ["SliceCodec", "weights_signature"]
