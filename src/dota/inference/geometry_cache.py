"""Work shared by every energy through one geometry (the energy layers of one spot).

In a pre-LayerNorm model the first block's slice tokens do not depend on the energy until attention
mixes in the energy token. For the slice token of slice i, attention in head h is a softmax over the
energy key and the slice keys j <= i + num_forward. Split it::

    out_hi = a_hi * mean_hi + (1 - a_hi) * v0_h,     a_hi = sigmoid(lse_hi - s0_hi)

where ``mean_hi`` is the attention average over slice keys only, ``lse_hi`` the log of that softmax's
normaliser, ``s0_hi`` the (scaled) score of the energy key and ``v0_h`` the energy token's value.
Everything but ``s0`` and ``v0`` depends on the geometry alone and is computed once
(:func:`geometry_state`): the encoder, the slice queries/keys/values, the slice-to-slice attention
(``mean`` and ``lse``) and, folded in, the output projection of ``mean`` per head. Each energy then
costs its own token, one score per slice and head, a small mix, the MLP, later blocks and the decoder
(:func:`energy_tokens`), each truncated to that energy's own range. Mathematically this is the plain
pass; numerically it differs by float rounding only (tests compare the two).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dota.inference.kernels import SliceCodec
from dota.model import DoTA, attention_mask


class PreparedBlock:
    """A transformer block's attention weights rearranged for the shared computation."""

    def __init__(self, block) -> None:
        attn = block.attn
        self.heads, self.head_dim = attn.num_heads, attn.head_dim
        self.inner = self.heads * self.head_dim
        d = attn.o.weight.shape[0]
        with torch.no_grad():
            self.w_qkv = torch.cat([attn.q.weight, attn.k.weight, attn.v.weight]).detach().contiguous()
            # (heads, head_dim, d_model): head h's block of the output projection, transposed
            self.wo_heads = attn.o.weight.detach().view(d, self.heads, self.head_dim).permute(1, 2, 0).contiguous()
        self.scale = 1.0 / math.sqrt(self.head_dim)

    def qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(..., d_model) normalised tokens -> q, k, v each (..., heads, head_dim)."""
        q, k, v = F.linear(h, self.w_qkv).split(self.inner, dim=-1)
        shape = (*h.shape[:-1], self.heads, self.head_dim)
        return q.reshape(shape), k.reshape(shape), v.reshape(shape)


@dataclass
class GeometryState:
    """The energy-independent part of the first block for the first ``length`` slices of one geometry."""

    length: int
    tokens: torch.Tensor  # (K, d) encoded slices + positions: first-block input of slice tokens
    q: torch.Tensor  # (heads, K, head_dim) queries of slice tokens
    lse: torch.Tensor  # (heads, K) float64 log-sum-exp of the scaled slice-to-slice scores of each slice query
    mixed: torch.Tensor  # (K, heads, d) slice-only attention average times each head's output projection
    look_k: torch.Tensor  # (heads, F, head_dim) keys of the first F = num_forward slices (energy token look-ahead)
    look_v: torch.Tensor  # (heads, F, head_dim) their values

    @property
    def nbytes(self) -> int:
        parts = (self.tokens, self.q, self.lse, self.mixed, self.look_k, self.look_v)
        return sum(t.numel() * t.element_size() for t in parts)


def geometry_state(model: DoTA, block: PreparedBlock, codec: SliceCodec, geometry: torch.Tensor) -> GeometryState:
    """Shared state for scaled geometry slices (K, H, W): the first K slices of a block."""
    nf = model.config.num_forward
    k_len = geometry.shape[0]
    tokens = codec.encode(geometry) + model.positions[1 : k_len + 1]
    q, k, v = block.qkv(model.blocks[0].ln1(tokens))
    q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (heads, K, head_dim)
    # Scores in float64: the split into slice part and energy part goes through lse - s0, a difference
    # of two numbers as large as the scores (hundreds with random weights), whose float32 rounding
    # would otherwise show in the dose at 1e-5 of the maximum.
    with torch.autocast(device_type=q.device.type, enabled=False):
        scores = torch.bmm(q.double(), k.double().transpose(1, 2)).mul_(block.scale)
        allowed = attention_mask(k_len, nf, device=scores.device)
        scores.masked_fill_(~allowed, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores.sub_(lse[..., None])).to(v.dtype)
    mean = torch.bmm(probs, v)  # (heads, K, head_dim)
    mixed = torch.bmm(mean, block.wo_heads.to(mean.dtype)).transpose(0, 1).contiguous()  # (K, heads, d)
    f = min(nf, k_len)
    return GeometryState(
        length=k_len,
        tokens=tokens,
        q=q.contiguous(),
        lse=lse,
        mixed=mixed,
        look_k=k[:, :f].contiguous(),
        look_v=v[:, :f].contiguous(),
    )


def crop_state(state: GeometryState, length: int) -> GeometryState:
    """The state of the first ``length`` slices, taken from a longer one.

    Rows near the end of a longer state saw keys a shorter computation would not have; they are the
    plain pass's values for those rows, so every row the caller needs stays exact (see
    :func:`energy_tokens`)."""
    if length >= state.length:
        return state
    return GeometryState(
        length=length,
        tokens=state.tokens[:length],
        q=state.q[:, :length],
        lse=state.lse[:, :length],
        mixed=state.mixed[:length],
        look_k=state.look_k[:, :length],
        look_v=state.look_v[:, :length],
    )


def energy_tokens(
    model: DoTA, blocks: list[PreparedBlock], state: GeometryState, energy: torch.Tensor, out_slices: list[int]
) -> torch.Tensor:
    """Final tokens of the first ``out_slices[e]`` slices for each scaled energy ``energy[e]``.

    Returns the tokens packed along the first axis: (sum(out_slices), d_model), energy by energy.
    ``state`` must cover ``min(L, max(out_slices) + num_blocks * num_forward)`` slices, so that every
    needed row sees the same keys as in the plain pass.
    """
    cfg = model.config
    k_len = state.length
    first, pb = model.blocks[0], blocks[0]
    x0 = model.energy_embedding(energy)[:, 0] + model.positions[0]  # (E, d)
    _, k0, v0 = pb.qkv(first.ln1(x0))  # (E, heads, head_dim)
    # energy column of the slice queries' attention, and the slice part's weight a = sigmoid(lse - s0)
    with torch.autocast(device_type=x0.device.type, enabled=False):
        s0 = torch.bmm(state.q.double(), k0.double().permute(1, 2, 0)).mul_(pb.scale)  # (heads, K, E)
        lse = state.lse[..., None]
        a = torch.sigmoid(lse - s0).float()
        b = torch.sigmoid(s0 - lse).float()
    r = torch.bmm(v0.transpose(0, 1), pb.wo_heads.to(v0.dtype))  # (heads, E, d): energy value, projected
    dt = state.mixed.dtype
    part_slices = torch.bmm(a.permute(1, 2, 0).to(dt), state.mixed)  # (K, E, d)
    part_energy = torch.bmm(b.permute(2, 1, 0).to(r.dtype), r.transpose(0, 1))  # (E, K, d)
    x = state.tokens[None] + part_slices.transpose(0, 1) + part_energy  # (E, K, d) first-block rows after attention

    if cfg.num_blocks == 1:
        return first.feed_forward(torch.cat([x[e, :n] for e, n in enumerate(out_slices)]))

    # later blocks need the energy token's own row: it attends to itself and the first num_forward slices
    keys = torch.cat([k0[:, :, None], state.look_k[None].expand(len(energy), -1, -1, -1).to(k0.dtype)], 2)
    vals = torch.cat([v0[:, :, None], state.look_v[None].expand(len(energy), -1, -1, -1).to(v0.dtype)], 2)
    row0 = x0[:, None] + first.attn.attend(first.ln1(x0)[:, None], keys, vals, None)  # (E, 1, d)
    x = first.feed_forward(torch.cat([row0, x], dim=1))  # (E, K + 1, d)
    mask = model.mask[: k_len + 1, : k_len + 1]
    for block in model.blocks[1:]:
        x = block(x, mask)
    return torch.cat([x[e, 1 : n + 1] for e, n in enumerate(out_slices)])


__all__ = ["GeometryState", "PreparedBlock", "geometry_state", "crop_state", "energy_tokens"]
