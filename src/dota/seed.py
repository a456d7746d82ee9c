"""The original DoTA's API, for code written against it: ``dota_energies(...)`` and a model object with
``predict([geometry, energies])`` and the KV-cache switches of the TensorFlow fork this project started from.

A thin wrapper: :class:`SeedModel` holds a :class:`dota.model.DoTA` network and the
:class:`dota.inference.InferenceEngine` that runs it; everything it does, they do::

    from dota.seed import dota_energies
    model = dota_energies(**json.load(open("hyperparam.json")))   # the original's file, unchanged
    model.count_params()                                           # 12,630,... for the paper's values
    dose = model.predict([geometry_hu, energies_mev])             # (N, L, H, W) Gy per 1e9 primaries
    model.enable_kv_cache(False)                                   # the plain full pass

New code uses the network and the engine directly (``dota.load_model``, ``dota.InferenceEngine``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dota.errors import InputError
from dota.inference.engine import InferenceEngine
from dota.model import DoTA, original_config


class SeedModel:
    """A DoTA network and its inference engine behind the original's method names."""

    def __init__(self, model: DoTA, **engine_options: Any) -> None:
        self.model = model.eval()
        self.engine = InferenceEngine(model, **engine_options)

    def predict(self, inputs: Any, energies_mev: Any = None, batch_size: int = 16) -> np.ndarray:
        """Dose (N, L, H, W) in Gy per 1e9 primaries for ``[geometry_hu, energies_mev]`` (the original's
        form) or ``(geometry_hu, energies_mev)`` as two arguments."""
        if energies_mev is None:
            if not isinstance(inputs, (list, tuple)) or len(inputs) != 2:
                raise InputError("predict needs [geometry_hu, energies_mev] or (geometry_hu, energies_mev)")
            inputs, energies_mev = inputs
        return self.engine.predict(inputs, energies_mev, batch_size=batch_size)

    def enable_kv_cache(self, enabled: bool = True) -> None:
        """Run predictions through the caching engine (default) or the plain full pass."""
        self.engine.enabled = bool(enabled)

    def reset_kv_cache(self) -> None:
        """Drop every cached geometry and prefix."""
        self.engine.reset()

    def count_params(self) -> int:
        """Number of weights (Keras' name)."""
        return self.model.num_parameters()


def dota_energies(*args: Any, **kwargs: Any) -> SeedModel:
    """The original constructor, ``dota_energies(num_tokens, input_shape, projection_dim, num_heads,
    num_transformers, kernel_size, dropout_rate=0.2, causal=True)``, with the original's arguments and
    semantics (described and checked by :func:`dota.model.original_config`): a fresh, untrained model."""
    return SeedModel(DoTA(original_config(*args, **kwargs)))


__all__ = ["SeedModel", "dota_energies"]
