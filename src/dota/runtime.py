"""Where computation runs: the torch device every command and the learned engine resolve (``--device``)."""

from __future__ import annotations

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
