"""Where computation runs: the torch device every command and the learned engine resolve (``--device``),
and the Ray session of the commands that spread work over workers (``dota generate``, batch plan dose)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

from dota.errors import InputError


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` picks CUDA when available; an explicit ``cuda`` without a GPU is a clear error."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda requested but no CUDA GPU is available (use --device cpu)")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise InputError(f"unknown device {name!r}: use auto, cpu or cuda")
    return torch.device(name)


@contextlib.contextmanager
def ray_session(num_cpus: int, address: str | None = None, *, purpose: str) -> Iterator[Any]:
    """The ``ray`` module, with Ray running: joins ``address`` (an existing cluster), else starts a local
    instance with ``num_cpus`` CPUs, unless Ray is already initialised; shuts down only what it started.
    ``purpose`` names the work in the error when Ray is not installed."""
    try:
        import ray
    except ImportError:
        raise InputError(f"{purpose} needs Ray: pip install 'dota-dose[ray]'") from None
    started = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=int(num_cpus), include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING)
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()
