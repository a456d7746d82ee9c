"""Inference: the engine that runs a DoTA model (truncation, caching, batching, precision)."""

from dota.inference.engine import InferenceEngine

__all__ = ["InferenceEngine"]
