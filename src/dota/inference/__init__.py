"""Inference: the engine that runs a DoTA model (truncation, caching, batching, precision)."""

from dota.inference.engine import InferenceEngine, exactness
from dota.inference.kv_cache import IncrementalDecoder, KVCache
from dota.inference.prefix_cache import PrefixCache
from dota.inference.runtime import configure_runtime, machine_info

__all__ = [
    "InferenceEngine",
    "IncrementalDecoder",
    "KVCache",
    "PrefixCache",
    "configure_runtime",
    "exactness",
    "machine_info",
]
