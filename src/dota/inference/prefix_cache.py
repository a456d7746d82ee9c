"""Content-addressed caches bounded in bytes: the prefix cache and the LRU under it.

Prefix cache. Dose at depth d depends only on the energy and slices 0..d (plus look-ahead), so two
requests with the same energy whose geometries share their leading slices share the state of the
network over those slices. The geometry is cut into blocks of ``block_slices`` slices; block j's key
is a hash chain ``key_j = H(key_{j-1} || slices of block j)`` starting from ``key_{-1} = H(model
fingerprint || energy)``, so a key names the model, the energy and the whole prefix up to and
including its block. An entry holds what feeding that block added to an
:class:`~dota.inference.kv_cache.IncrementalDecoder` (per-block keys, values and input rows) and the
dose slices that became final. A lookup walks the chain from the front and stops at the first miss;
an evicted block therefore ends every prefix through it, and no entry can be reached by a prefix
other than its own (no stale hits).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dota.inference.kv_cache import LayerRows


class ByteLRU:
    """A least-recently-used mapping bounded by the bytes of its values (``value.nbytes``).

    A value larger than the whole budget is not stored.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._data: OrderedDict[Any, Any] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = self.inserts = 0

    def get(self, key: Any) -> Any | None:
        value = self._data.get(key)
        if value is None:
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return value

    def peek(self, key: Any) -> Any | None:
        """The value without counting a hit or refreshing its age."""
        return self._data.get(key)

    def put(self, key: Any, value: Any) -> bool:
        """Store ``value``; evict the oldest entries until it fits. False when it can never fit."""
        size = int(value.nbytes)
        if size > self.max_bytes:
            return False
        old = self._data.pop(key, None)
        if old is not None:
            self.bytes -= int(old.nbytes)
        while self._data and self.bytes + size > self.max_bytes:
            _, evicted = self._data.popitem(last=False)
            self.bytes -= int(evicted.nbytes)
            self.evictions += 1
        self._data[key] = value
        self.bytes += size
        self.inserts += 1
        return True

    def clear(self) -> None:
        self._data.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Any) -> bool:
        return key in self._data

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self._data),
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "inserts": self.inserts,
        }


@dataclass
class PrefixBlock:
    """What one block of slices added to the network's state, and the dose slices it made final."""

    layers: list[LayerRows]
    dose: torch.Tensor  # (n, H, W) scaled dose slices

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.layers) + self.dose.numel() * self.dose.element_size()


class PrefixCache(ByteLRU):
    """LRU of :class:`PrefixBlock` entries keyed by a hash chain over (model, energy, slices)."""

    def __init__(self, max_bytes: int, block_slices: int = 16) -> None:
        super().__init__(max_bytes)
        if block_slices < 1:
            raise ValueError(f"block_slices must be >= 1, got {block_slices}")
        self.block_slices = int(block_slices)

    def chain(self, model_key: bytes, energy_scaled: float, geometry: np.ndarray, num_blocks: int) -> list[bytes]:
        """Keys of the first ``num_blocks`` blocks of one geometry (L, H, W) at one energy."""
        bs = self.block_slices
        key = _digest(model_key, np.float32(energy_scaled).tobytes(), np.int64(bs).tobytes())
        keys = []
        for j in range(num_blocks):
            key = _digest(key, np.ascontiguousarray(geometry[j * bs : (j + 1) * bs], dtype=np.float32).data)
            keys.append(key)
        return keys

    def longest_prefix(self, keys: list[bytes]) -> list[PrefixBlock]:
        """Entries of the leading keys present in the cache (stops at the first miss)."""
        found = []
        for key in keys:
            entry = self.get(key)
            if entry is None:
                break
            found.append(entry)
        return found


def _digest(*parts) -> bytes:
    """128-bit content digest (SHA-256, hardware-accelerated on current x86)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.digest()[:16]


def model_fingerprint(model: torch.nn.Module) -> bytes:
    """A digest of a model's parameters and config: prefix-cache keys never mix two models."""
    h = hashlib.sha256()
    h.update(repr(getattr(model, "config", "")).encode())
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.digest()[:16]


__all__ = ["ByteLRU", "PrefixBlock", "PrefixCache", "model_fingerprint"]
