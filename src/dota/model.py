"""The DoTA network: a per-slice CNN encoder, an energy token, a causal transformer along depth and a
per-slice decoder. Readable top to bottom; how it is *run* (truncation, caching, batching) lives in
:mod:`dota.inference`.

Shapes: a beamlet is a CT block (L, H, W) in the beam's-eye view (depth first) plus one energy. The
encoder turns each of the L slices into a token of width ``d_model``; the energy becomes token 0; the
transformer mixes tokens causally (token i sees tokens j <= i + num_forward); the decoder turns each
slice token back into a dose slice. The network works on scaled quantities (see
:class:`Normalization`); :class:`dota.inference.InferenceEngine` runs a model from HU and MeV to Gy per
1e9 primaries.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dota.constants import BLOCK_SHAPE, HU_CLIP, PAPER_ENERGY_RANGE_MEV, VOXEL_MM
from dota.errors import InputError

#: What a model's dose is added to: nothing, or the analytic pencil-beam engine's dose.
BASE_ENGINES: tuple[str, ...] = ("", "analytic", "analytic-bdl")


@dataclass(frozen=True)
class DoTAConfig:
    block_shape: tuple[int, int, int] = BLOCK_SHAPE  # (depth L, rows H, cols W) voxels; H, W divisible by 4
    voxel_mm: tuple[float, float, float] = VOXEL_MM  # voxel size (depth, row, col)
    enc_channels: tuple[int, int, int] = (64, 64, 12)  # conv encoder widths; the last sets the token width
    enc_groups: tuple[int, int, int] = (16, 16, 4)  # GroupNorm groups after each encoder conv
    kernel_size: int = 5  # conv kernel (encoder and decoder), odd
    num_heads: int = 16  # attention heads
    head_dim: int = 432  # key/query/value size per head (Keras key_dim)
    num_blocks: int = 1  # transformer blocks (pre-LN)
    mlp_dims: tuple[int, ...] = (432, 432)  # MLP widths, GELU after each; the last must equal d_model
    num_forward: int = 0  # look-ahead: token i attends to j <= i + num_forward
    decoder_norm: bool = True  # GroupNorm in the decoder (paper); it removes each slice's dose scale
    dropout: float = 0.2  # dropout in attention and MLP (training only)
    ln_eps: float = 1e-6  # LayerNorm epsilon (Keras default used by the paper)
    base_engine: str = ""  # "" (the network predicts the dose) or "analytic": it predicts a correction to it
    base_input: bool = False  # the base dose is also an input channel of the encoder (beside the CT)
    # Range support (models with a base engine): the dose is zero from ``support_margin_mm`` beyond the
    # last slice where the base dose exceeds ``support_fraction`` of its maximum (0: no support, every slice).
    support_fraction: float = 0.0
    support_margin_mm: float = 0.0

    @property
    def d_model(self) -> int:
        """Token width: the flattened encoder output of one slice."""
        _, h, w = self.block_shape
        return (h // 4) * (w // 4) * self.enc_channels[-1]

    @property
    def num_tokens(self) -> int:
        """Energy token + one token per slice."""
        return self.block_shape[0] + 1

    def __post_init__(self) -> None:
        l, h, w = self.block_shape
        if h % 4 or w % 4 or l < 1:
            raise InputError(f"block_shape {self.block_shape}: H and W must be multiples of 4")
        if self.kernel_size % 2 == 0:
            raise InputError(f"kernel_size must be odd, got {self.kernel_size}")
        for c, g in zip(self.enc_channels, self.enc_groups):
            if c % g:
                raise InputError(f"encoder channels {c} not divisible by GroupNorm groups {g}")
        if self.mlp_dims[-1] != self.d_model:
            raise InputError(f"the last MLP width {self.mlp_dims[-1]} must equal d_model {self.d_model}")
        if self.num_forward < 0 or self.num_blocks < 1 or self.num_heads < 1:
            raise InputError("num_forward must be >= 0, num_blocks and num_heads >= 1")
        if self.base_engine not in BASE_ENGINES:
            raise InputError(f"base_engine must be one of {BASE_ENGINES}, got {self.base_engine!r}")
        if self.base_input and not self.base_engine:
            raise InputError("base_input needs a base_engine")
        if not (0.0 <= self.support_fraction < 1.0) or not (0.0 <= self.support_margin_mm < 1e4):
            raise InputError(f"support_fraction must be in [0, 1) and support_margin_mm in [0, 1e4) mm, got "
                             f"{self.support_fraction!r}, {self.support_margin_mm!r}")
        if self.support_fraction and not self.base_engine:
            raise InputError("a range support (support_fraction > 0) needs a base_engine")

    @classmethod
    def from_name(cls, name: str) -> DoTAConfig:
        """A named preset: ``paper``, ``small`` or ``tiny`` (see :data:`PRESETS`)."""
        try:
            return PRESETS[name]
        except KeyError:
            raise InputError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DoTAConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InputError(f"unknown DoTAConfig fields {sorted(unknown)}")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**kwargs)


PRESETS: dict[str, DoTAConfig] = {
    # The published model: 12.63 M parameters, 1 block, 16 heads of size 432.
    "paper": DoTAConfig(),
    # Trains in minutes on 2 CPU cores; same block and token layout, narrower everywhere. No GroupNorm
    # in the decoder: GroupNorm normalises each dose slice, so the slice's dose level must be coded in
    # feature patterns; without it the small model found the Bragg peak far sooner
    # (300 steps: validation MSE 3.8e-4 vs 1.1e-3; see the README).
    "small": DoTAConfig(
        enc_channels=(16, 16, 4), enc_groups=(4, 4, 2), num_heads=4, head_dim=36, num_blocks=2,
        mlp_dims=(144, 144), dropout=0.1, decoder_norm=False,
    ),
    # For tests of multi-block models with look-ahead: tiny and fast, num_forward = 2.
    "tiny": DoTAConfig(
        enc_channels=(8, 8, 2), enc_groups=(4, 4, 2), num_heads=2, head_dim=16, num_blocks=2,
        mlp_dims=(72, 72), num_forward=2, dropout=0.1, decoder_norm=False,
    ),
}
# Physics-informed variants: the network learns the Monte Carlo dose minus the analytic pencil beam's
# (dota.engines.analytic), which is computed at inference and added; its output layer starts at zero, so
# an untrained model is the analytic engine.
# "-res": the correction is learned from the CT and energy alone, so every energy of one geometry still
# shares the encoder (the engine's geometry sharing). "-pb": the analytic dose is also an input channel
# (as ADoTA feeds an analytic beam), so the correction can follow the pencil beam it corrects; the
# encoder then depends on the energy and the engine shares nothing between energies.
PRESETS["small-res"] = replace(PRESETS["small"], base_engine="analytic")
PRESETS["tiny-res"] = replace(PRESETS["tiny"], base_engine="analytic")
PRESETS["small-pb"] = replace(PRESETS["small"], base_engine="analytic", base_input=True)
PRESETS["tiny-pb"] = replace(PRESETS["tiny"], base_engine="analytic", base_input=True)
PRESETS["paper-pb"] = replace(PRESETS["paper"], base_engine="analytic", base_input=True, decoder_norm=False)


@dataclass
class Normalization:
    """Min-max scaling between physical units and the network's inputs and outputs.

    Geometry: HU clipped to ``hu_range`` then mapped to [0, 1]. Energy: MeV mapped from
    ``energy_range_mev`` to [0, 1] (also the trained range: predictions outside it are refused).
    Dose: Gy per 1e9 primaries divided by ``dose_max``. Computed from training data
    (:func:`dota.data.compute_normalization`) and stored with the checkpoint.
    """

    hu_range: tuple[float, float] = HU_CLIP
    energy_range_mev: tuple[float, float] = PAPER_ENERGY_RANGE_MEV
    dose_max: float = 1.0

    def scale_geometry(self, hu: torch.Tensor) -> torch.Tensor:
        lo, hi = self.hu_range
        return (hu.clamp(lo, hi) - lo) / (hi - lo)

    def scale_energy(self, energy_mev: torch.Tensor) -> torch.Tensor:
        lo, hi = self.energy_range_mev
        return (energy_mev - lo) / (hi - lo)

    def unscale_dose(self, dose_scaled: torch.Tensor) -> torch.Tensor:
        return dose_scaled * self.dose_max

    def scale_dose(self, dose: torch.Tensor) -> torch.Tensor:
        return dose / self.dose_max

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalization:
        return cls(
            hu_range=tuple(float(x) for x in data["hu_range"]),
            energy_range_mev=tuple(float(x) for x in data["energy_range_mev"]),
            dose_max=float(data["dose_max"]),
        )


# ---------------------------------------------------------------------------------------------
# Blocks


def max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)`` for even H and W, as two maxima of strided views: the same values, fast in any
    memory layout (torch's pooling is slow on the NCHW output a convolution of a one-channel input gives)."""
    rows = torch.maximum(x[:, :, 0::2], x[:, :, 1::2])
    return torch.maximum(rows[..., 0::2], rows[..., 1::2])


def conv_to_one_channel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, padding: int) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=padding)[:, 0]`` for a (1, C, k, k) kernel: (N, C, H, W) -> (N, H, W).

    The same sum in another order: a (k*k taps) x C product with the activations, then a shift-and-add of
    the k*k tap planes (zero padding by clipping). Convolution libraries pad the single output channel to
    a full vector width and run such a layer at a fraction of peak; this runs at matrix-product speed.
    """
    n, c, h, w = x.shape
    k, p = weight.shape[-1], padding
    taps = weight[0].permute(1, 2, 0).reshape(k * k, c)  # row ky*k + kx: the kernel's weights for that tap
    flat = x.permute(0, 2, 3, 1).reshape(-1, c)  # a view for channels-last input
    z = torch.mm(taps.to(flat.dtype), flat.t()).view(k * k, n, h, w)  # one plane per tap
    centre = p * k + p
    out = z[centre] + bias.to(z.dtype)
    for tap in range(k * k):
        if tap == centre:
            continue
        dy, dx = tap // k - p, tap % k - p
        # out[i, j] += z[tap, i + dy, j + dx] wherever that lies inside the slice (zero padding)
        out[:, max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)] += z[
            tap, :, max(0, dy) : h + min(0, dy), max(0, dx) : w + min(0, dx)
        ]
    return out


def _needs_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def _relu(x: torch.Tensor) -> torch.Tensor:
    """ReLU, in place where no gradient is taken (inference reuses the buffer)."""
    return F.relu(x) if _needs_grad(x) else F.relu_(x)


def _pool(x: torch.Tensor) -> torch.Tensor:
    """2x2 max pooling: torch's layer where a gradient is taken (its backward is 2x faster than that of
    the strided maxima), :func:`max_pool_2x2` for inference (10x faster forward here)."""
    return F.max_pool2d(x, 2) if _needs_grad(x) else max_pool_2x2(x)


#: Slices per piece when the per-slice encoder and decoder run without a gradient (:func:`_per_slice`).
INFERENCE_SLICE_CHUNK = 128


def _per_slice(layer: Callable[[torch.Tensor], torch.Tensor], slices: torch.Tensor) -> torch.Tensor:
    """``layer(slices)`` for a layer that acts on each slice (row of ``slices``) alone, in pieces of
    :data:`INFERENCE_SLICE_CHUNK` slices where no gradient is taken: the same values (each slice's arithmetic is unchanged; tests), but
    the temporaries of a piece stay in the cache and the allocator reuses them. Measured here (the shipped
    model's size, 2,400 slices, one thread): the encoder 245 -> 99 ms, the decoder 213 -> 111 ms, bit for
    bit; 16-slice pieces 130 / 162 ms, 256-slice pieces 100 / 120 ms. With a gradient the layer runs on all
    slices at once (training's backward pass)."""
    n, chunk = slices.shape[0], INFERENCE_SLICE_CHUNK
    if torch.is_grad_enabled() or n <= chunk:
        return layer(slices)
    first = layer(slices[:chunk])
    out = first.new_empty((n, *first.shape[1:]))
    out[:chunk] = first
    for s in range(chunk, n, chunk):
        out[s : s + chunk] = layer(slices[s : s + chunk])
    return out


class SliceEncoder(nn.Module):
    """Per-slice CNN: (n, C, H, W) -> (n, d_model). Conv-GroupNorm-MaxPool-ReLU twice, then
    Conv-GroupNorm-ReLU, flattened channels-last (rows, cols, channels) as in the Keras original.
    C is 1 (the CT), or 2 with the base dose as channel 1 (``base_input``)."""

    def __init__(self, cfg: DoTAConfig) -> None:
        super().__init__()
        c1, c2, c3 = cfg.enc_channels
        g1, g2, g3 = cfg.enc_groups
        k, p = cfg.kernel_size, cfg.kernel_size // 2
        self.in_channels = 2 if cfg.base_input else 1
        self.conv1, self.norm1 = nn.Conv2d(self.in_channels, c1, k, padding=p, bias=False), nn.GroupNorm(g1, c1, eps=1e-3)
        self.conv2, self.norm2 = nn.Conv2d(c1, c2, k, padding=p, bias=False), nn.GroupNorm(g2, c2, eps=1e-3)
        self.conv3, self.norm3 = nn.Conv2d(c2, c3, k, padding=p, bias=False), nn.GroupNorm(g3, c3, eps=1e-3)

    def forward(self, x: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        """``memory_format``: the layout of the activations (channels-last is oneDNN's fast one on x86)."""
        if x.ndim == 3:  # (n, H, W): one channel
            x = x.unsqueeze(1)
        layers = ((self.conv1, self.norm1), (self.conv2, self.norm2), (self.conv3, self.norm3))
        for i, (conv, norm) in enumerate(layers):
            x = norm(conv(x))
            if i < 2:
                x = _pool(x).contiguous(memory_format=memory_format)
            x = _relu(x)
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)


class SliceDecoder(nn.Module):
    """Per-slice decoder: (n, d_model) -> (n, H, W). Two stride-2 transposed convs with
    GroupNorm (if ``decoder_norm``) and ReLU, then a conv to one channel (with bias)."""

    def __init__(self, cfg: DoTAConfig) -> None:
        super().__init__()
        c1, c2, c3 = cfg.enc_channels
        g1, g2, _ = cfg.enc_groups
        k, p = cfg.kernel_size, cfg.kernel_size // 2
        self.grid = (cfg.block_shape[1] // 4, cfg.block_shape[2] // 4, c3)
        self.up1 = nn.ConvTranspose2d(c3, c2, k, stride=2, padding=p, output_padding=1)
        self.norm1 = nn.GroupNorm(g2, c2, eps=1e-3) if cfg.decoder_norm else None
        self.up2 = nn.ConvTranspose2d(c2, c1, k, stride=2, padding=p, output_padding=1)
        self.norm2 = nn.GroupNorm(g1, c1, eps=1e-3) if cfg.decoder_norm else None
        self.out = nn.Conv2d(c1, 1, k, padding=p)

    def forward(self, tokens: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        h, w, c = self.grid
        x = tokens.reshape(-1, h, w, c).permute(0, 3, 1, 2)  # a channels-last view
        if memory_format is not torch.channels_last:
            x = x.contiguous(memory_format=memory_format)
        for up, norm in ((self.up1, self.norm1), (self.up2, self.norm2)):
            x = up(x)
            x = _relu(x if norm is None else norm(x))
        if _needs_grad(x):  # training: the library's convolution has the faster backward (3.5x here)
            return self.out(x)[:, 0]
        x = x.contiguous(memory_format=torch.channels_last)  # the tap product reads it as a matrix
        return conv_to_one_channel(x, self.out.weight, self.out.bias, self.out.padding[0])


class Attention(nn.Module):
    """Multi-head attention without biases, heads of size ``head_dim`` (inner width heads*head_dim).

    Split in two so that a cache can sit between them (the incremental decoder keeps every row's keys
    and values and attends later rows to them): :meth:`keys_values` of some rows, :meth:`attend` of
    other (query) rows to any keys and values. :meth:`forward` is the two on the same rows.
    """

    def __init__(self, cfg: DoTAConfig) -> None:
        super().__init__()
        d, inner = cfg.d_model, cfg.num_heads * cfg.head_dim
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q = nn.Linear(d, inner, bias=False)
        self.k = nn.Linear(d, inner, bias=False)
        self.v = nn.Linear(d, inner, bias=False)
        self.o = nn.Linear(inner, d, bias=False)
        self.dropout = cfg.dropout

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, heads*head_dim) -> (B, heads, T, head_dim)."""
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    def keys_values(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised rows (B, T, d) -> keys and values, each (B, heads, T, head_dim)."""
        return self.split_heads(self.k(h)), self.split_heads(self.v(h))

    def attend(self, h: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        """Normalised query rows (B, T, d) attending to keys/values (B, heads, S, head_dim); ``mask`` (T, S)
        is True where a query row may see a key. Returns (B, T, d), after the output projection."""
        q = self.split_heads(self.q(h))
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask, dropout_p=drop)
        return self.o(y.transpose(1, 2).flatten(2))

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.attend(h, *self.keys_values(h), mask)


class MLP(nn.Module):
    def __init__(self, cfg: DoTAConfig) -> None:
        super().__init__()
        dims = (cfg.d_model, *cfg.mlp_dims)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = self.drop(F.gelu(layer(x)))
        return x


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)).

    Cache-aware in the same split as :class:`Attention`: :meth:`keys_values` of input rows, then
    :meth:`finish` of query rows against any cached keys and values. The inference engine's paths
    (incremental decoding, geometry sharing) are built from these pieces and :meth:`feed_forward`,
    so the block's arithmetic is written here once.
    """

    def __init__(self, cfg: DoTAConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.mlp = MLP(cfg)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Input rows (B, T, d) -> their keys and values (B, heads, T, head_dim)."""
        return self.attn.keys_values(self.ln1(x))

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The second half: x + MLP(LN(x)), row by row."""
        return x + self.mlp(self.ln2(x))

    def finish(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        """Output rows for input rows ``x`` (B, T, d) attending to ``keys``/``values`` with ``mask`` (T, S)."""
        return self.feed_forward(x + self.attn.attend(self.ln1(x), keys, values, mask))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        h = self.ln1(x)
        return self.feed_forward(x + self.attn(h, mask))


def attention_mask(num_tokens: int, num_forward: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean (T, T) mask, True where token i may attend to token j (j <= i + num_forward)."""
    i = torch.arange(num_tokens, device=device)
    return i[None, :] <= i[:, None] + num_forward


# ---------------------------------------------------------------------------------------------
# The model


class DoTA(nn.Module):
    """DoTA: (B, L, H, W) scaled geometry + (B,) scaled energy -> (B, L, H, W) scaled dose.

    The pieces are separate methods so that an inference engine can run them selectively:
    :meth:`encode` (per slice), :meth:`energy_embedding`, :meth:`add_positions`, ``blocks`` (each
    cache-aware: :class:`Block`), :meth:`decode` (per slice). The model knows nothing of how it is run:
    :class:`dota.inference.InferenceEngine` holds a model and runs it from HU and MeV to Gy.
    """

    def __init__(self, config: DoTAConfig | None = None, normalization: Normalization | None = None) -> None:
        super().__init__()
        self.config = cfg = config or DoTAConfig()
        self.normalization = normalization or Normalization()
        self.encoder = SliceEncoder(cfg)
        self.energy = nn.Linear(1, cfg.d_model)
        self.positions = nn.Parameter(torch.zeros(cfg.num_tokens, cfg.d_model))
        nn.init.normal_(self.positions, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_blocks))
        self.decoder = SliceDecoder(cfg)
        self.register_buffer("mask", attention_mask(cfg.num_tokens, cfg.num_forward), persistent=False)

    # -- pieces ------------------------------------------------------------------------------
    def encode(self, geometry: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format
               ) -> torch.Tensor:
        """(B, l, H, W) scaled geometry, or (B, l, C, H, W) with the base dose as channel 1 for a model with
        ``base_input`` -> (B, l, d_model) slice tokens (no positions)."""
        b, l = geometry.shape[:2]
        h, w = geometry.shape[-2:]
        c = geometry.shape[2] if geometry.ndim == 5 else 1
        slices = geometry.reshape(b * l, c, h, w)
        return _per_slice(lambda x: self.encoder(x, memory_format), slices).view(b, l, -1)

    def network_input(self, geometry_scaled: torch.Tensor, base_scaled: torch.Tensor | None) -> torch.Tensor:
        """What :meth:`forward` takes: the scaled geometry (B, L, H, W), with the scaled base dose stacked
        as a second channel, (B, L, 2, H, W), for a model with ``base_input``."""
        if not self.config.base_input:
            return geometry_scaled
        if base_scaled is None:
            raise InputError("this model takes the base dose as an input: compute it with base_dose_scaled")
        return torch.stack([geometry_scaled, base_scaled.to(geometry_scaled.dtype)], dim=2)

    def energy_embedding(self, energy: torch.Tensor) -> torch.Tensor:
        """(B,) scaled energy -> (B, 1, d_model) energy token (no position)."""
        return self.energy(energy.reshape(-1, 1, 1).to(self.energy.weight.dtype))

    def add_positions(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Add learned positions to tokens occupying positions start..start+T-1 (0 is the energy)."""
        return tokens + self.positions[start : start + tokens.shape[1]]

    def base_dose_scaled(self, geometry_hu: np.ndarray, energies_mev: np.ndarray) -> torch.Tensor | None:
        """The base dose (``config.base_engine``) of HU blocks and MeV energies, divided by ``dose_max``
        (the network's output scale), or None for a model without a base. The engine, training and
        evaluation add it to the network's output; it is not part of :meth:`forward`."""
        if not self.config.base_engine:
            return None
        from dota.engines.analytic import AnalyticEngine

        spot_model = "beam-model" if self.config.base_engine == "analytic-bdl" else "dota"
        dose = AnalyticEngine(spot_model=spot_model).dose(geometry_hu, energies_mev, self.config.voxel_mm)
        return torch.from_numpy(dose).to(self.device) / float(self.normalization.dose_max)

    def support_slices(self, base_scaled: torch.Tensor | None) -> np.ndarray | None:
        """Slices ``[0, s)`` that may hold dose, per beamlet (N,), for a model with a range support
        (``config.support_fraction > 0``): ``s`` is ``ceil(support_margin_mm / depth voxel)`` slices past the
        last slice where the base dose (N, L, H, W) exceeds ``support_fraction`` of its maximum, at most L.
        None for a model without one. The model's dose is zero from slice ``s`` on: every inference path
        (and the plain pass they are tested against) applies it, so a path that computes only ``[0, s)``
        is exact by construction (attention is causal, without look-ahead beyond ``num_forward``)."""
        cfg = self.config
        if not cfg.support_fraction or base_scaled is None:
            return None
        n, length = base_scaled.shape[:2]
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        per_slice = base_scaled.reshape(n, length, -1).amax(dim=2)  # (N, L)
        peak = per_slice.amax(dim=1, keepdim=True)
        above = (per_slice > cfg.support_fraction * peak) & (peak > 0)
        idx = torch.arange(length, device=per_slice.device).expand_as(per_slice)
        last = torch.where(above, idx, torch.full_like(idx, -1)).amax(dim=1).cpu().numpy()
        margin = int(np.ceil(cfg.support_margin_mm / float(cfg.voxel_mm[0]) - 1e-9))
        return np.clip(last + 1 + margin, 1, length).astype(np.int64)

    def decode(self, tokens: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format
               ) -> torch.Tensor:
        """(B, l, d_model) slice tokens after the transformer -> (B, l, H, W) scaled dose."""
        b, l, _ = tokens.shape
        _, h, w = self.config.block_shape
        return _per_slice(lambda x: self.decoder(x, memory_format), tokens.reshape(b * l, -1)).view(b, l, h, w)

    # -- the plain full forward pass ------------------------------------------------------------
    def forward(self, geometry: torch.Tensor, energy: torch.Tensor,
                memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        """Plain full pass over all L slices; the reference every fast path is tested against.
        ``memory_format`` is the convolutions' layout (the same values up to float rounding).

        For a model with a ``base_engine`` this is the scaled correction to the base dose."""
        x = torch.cat([self.energy_embedding(energy), self.encode(geometry, memory_format)], dim=1)
        x = self.add_positions(x)
        mask = self.mask[: x.shape[1], : x.shape[1]]
        for block in self.blocks:
            x = block(x, mask)
        return self.decode(x[:, 1:], memory_format)

    # -- bookkeeping --------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.positions.device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def original_config(
    num_tokens: int,
    input_shape: Any,
    projection_dim: Any,
    num_heads: int,
    num_transformers: int,
    kernel_size: int,
    dropout_rate: float = 0.2,
    causal: bool = True,
) -> DoTAConfig:
    """The configuration the original DoTA constructor (``models.dota_energies``) builds, with the original's
    semantics, so that its ``hyperparam.json`` can be passed unchanged (:func:`dota.seed.dota_energies`
    builds the model from it: ``dota_energies(**json.load(open("hyperparam.json")))``).

    ``num_tokens`` counts the energy token: L + 1 (151 for 150 slices). ``input_shape`` is one slice,
    (H, W, 1) (or (H, W)). ``projection_dim`` is the encoder's output shape per slice,
    (H / 4, W / 4, C): its product is the token width and the key size of every head (6 x 6 x 12 = 432),
    C the last encoder convolution's channels. As in the original, the other encoder and decoder layers
    have 64 channels (GroupNorm of 16 groups; 4 after the last encoder convolution), the MLP has two
    layers of the token width, and ``causal=False`` lets every token attend to every other.
    The paper's values (``num_tokens=151, input_shape=[24, 24, 1], projection_dim=[6, 6, 12],
    num_heads=16, num_transformers=1, kernel_size=5``) give the ``paper`` preset.

    Raises
    ------
    InputError
        For values the original could not build (e.g. a ``projection_dim`` whose H, W are not
        ``input_shape``'s divided by 4), naming the argument.
    """

    def whole(name: str, value: Any, lo: int = 1) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
            raise InputError(f"dota_energies: {name} must be an integer >= {lo}, got {value!r}")
        return int(value)

    def shape_of(name: str, value: Any) -> tuple[int, ...]:
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
            return ()
        return tuple(whole(f"{name} entry", v) for v in value)

    num_tokens = whole("num_tokens", num_tokens, 2)
    slice_shape = shape_of("input_shape", input_shape)
    if len(slice_shape) not in (2, 3) or (len(slice_shape) == 3 and slice_shape[2] != 1):
        raise InputError(f"dota_energies: input_shape is one CT slice (H, W, 1), as in the original "
                         f"(the depth is num_tokens - 1); got {input_shape!r}")
    h, w = slice_shape[:2]
    if h % 4 or w % 4:
        raise InputError(f"dota_energies: input_shape {tuple(slice_shape)}: H and W must be multiples of 4 "
                         "(the encoder pools twice by 2)")
    proj = shape_of("projection_dim", projection_dim)
    if len(proj) != 3:
        cells = (h // 4) * (w // 4)
        if isinstance(projection_dim, (int, np.integer)) and projection_dim > 0 and projection_dim % cells == 0:
            hint = f"a key size of {projection_dim} is [{h // 4}, {w // 4}, {projection_dim // cells}]"
        else:
            hint = f"e.g. [{h // 4}, {w // 4}, 12]"
        raise InputError(f"dota_energies: projection_dim is the encoder's output per slice [H/4, W/4, C] "
                         f"({hint}); got {projection_dim!r}")
    if proj[:2] != (h // 4, w // 4):
        raise InputError(f"dota_energies: projection_dim {list(proj)} must start with input_shape's H/4, W/4 = "
                         f"{h // 4}, {w // 4} (input_shape {tuple(slice_shape)})")
    channels = proj[2]
    if channels % 4:
        raise InputError(f"dota_energies: the last entry of projection_dim ({channels} channels) must be a "
                         "multiple of 4 (GroupNorm of 4 groups, as in the original)")
    if not isinstance(causal, (bool, np.bool_)):
        raise InputError(f"dota_energies: causal must be true or false, got {causal!r}")
    rate = float(dropout_rate) if not isinstance(dropout_rate, bool) else -1.0
    if not 0.0 <= rate < 1.0:
        raise InputError(f"dota_energies: dropout_rate must be in [0, 1), got {dropout_rate!r}")
    num_slices = num_tokens - 1
    d_model = h // 4 * (w // 4) * channels
    cfg = replace(
        PRESETS["paper"],
        block_shape=(num_slices, h, w),
        enc_channels=(64, 64, channels),
        enc_groups=(16, 16, 4),
        kernel_size=whole("kernel_size", kernel_size),
        num_heads=whole("num_heads", num_heads),
        head_dim=d_model,
        num_blocks=whole("num_transformers", num_transformers),
        mlp_dims=(d_model, d_model),
        dropout=rate,
        num_forward=0 if causal else num_slices,
    )
    return cfg


def init_weights(model: DoTA, seed: int | None = None) -> DoTA:
    """Re-initialise with a seeded generator (Glorot-uniform linears, like Keras)."""
    gen = torch.Generator().manual_seed(0 if seed is None else seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(m.weight)
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                m.weight.copy_(torch.empty_like(m.weight).uniform_(-bound, bound, generator=gen))
                if m.bias is not None:
                    m.bias.zero_()
        model.positions.copy_(torch.randn(model.positions.shape, generator=gen) * 0.02)
        if model.config.base_engine:  # start as the base engine: zero correction
            model.decoder.out.weight.zero_()
    return model


__all__ = ["DoTA", "DoTAConfig", "Normalization", "PRESETS", "original_config", "attention_mask", "max_pool_2x2",
           "conv_to_one_channel"]
