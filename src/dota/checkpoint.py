"""Saving and loading models without unpickling code.

A model checkpoint is one ``.safetensors`` file: the weights, plus JSON metadata holding the
:class:`~dota.model.DoTAConfig`, the :class:`~dota.model.Normalization` and provenance. Training
state for resuming (optimizer, scheduler, RNG) is a separate ``torch.save`` file read back with
``weights_only=True``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dota.errors import DataFileError, InputError
from dota.fileio import atomic_write
from dota.model import PRESETS, DoTA, DoTAConfig, Normalization, init_weights

CHECKPOINT_FORMAT = "dota-checkpoint-1"


def save_model(model: DoTA, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (weights, config, normalisation, ``extra`` provenance) to a safetensors file."""
    from safetensors.torch import save_file

    from dota import __version__

    meta = {
        "format": CHECKPOINT_FORMAT,
        "config": json.dumps(model.config.to_dict()),
        "normalization": json.dumps(model.normalization.to_dict()),
        "created_by": f"dota-dose {__version__}",
        "extra": json.dumps(extra or {}),
    }
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))
    return Path(path)


def read_checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """Config, normalisation and provenance of a checkpoint, without loading the weights."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise DataFileError(f"checkpoint {path} is corrupt or not a safetensors file ({exc})") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise DataFileError(f"{path} is not a dota checkpoint (format {meta.get('format')!r})")
    return {
        "config": json.loads(meta["config"]),
        "normalization": json.loads(meta["normalization"]),
        "created_by": meta.get("created_by", ""),
        "extra": json.loads(meta.get("extra", "{}")),
    }


#: The name of the trained model shipped inside the package (``dota/resources/models``).
DEFAULT_MODEL = "default"


def default_model_path() -> Path:
    """Path of the shipped default model's weights (``dota/resources/models/default.safetensors``)."""
    from importlib import resources

    return Path(str(resources.files("dota").joinpath("resources", "models", f"{DEFAULT_MODEL}.safetensors")))


def load_model(name_or_path: str | Path = DEFAULT_MODEL, device: str | torch.device = "cpu",
               seed: int | None = None) -> DoTA:
    """A model in eval mode: ``"default"`` (the default) loads the trained model shipped in the package
    (its model card: ``dota/resources/models/default.md``), a preset name (``paper``, ``small``, ``tiny``,
    ...) gives fresh weights (seeded), a path loads a checkpoint written by :func:`save_model`."""
    if isinstance(name_or_path, str) and name_or_path == DEFAULT_MODEL:
        path = default_model_path()
        if not path.is_file():
            raise DataFileError(f"the default model is missing from this installation ({path}); "
                                "reinstall dota-dose or pass a checkpoint path")
        name_or_path = path
    if isinstance(name_or_path, str) and name_or_path in PRESETS:
        model = init_weights(DoTA(DoTAConfig.from_name(name_or_path)), seed)
        return model.to(device).eval()
    from safetensors.torch import load_file

    meta = read_checkpoint_metadata(name_or_path)
    model = DoTA(DoTAConfig.from_dict(meta["config"]), Normalization.from_dict(meta["normalization"]))
    model.checkpoint_info = meta
    try:
        state = load_file(str(name_or_path))
    except Exception as exc:
        raise DataFileError(f"checkpoint {name_or_path} has corrupt weights ({exc})") from None
    load_state_checked(model, state, str(name_or_path))
    return model.to(device).eval()


def load_state_checked(model: DoTA, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a state dict, naming the first mismatch instead of torch's multi-line error."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise InputError(
            f"{source} does not fit this model config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise InputError(
                f"{source} does not fit this model config: {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}"
            )
    model.load_state_dict(state)


def save_training_state(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically write a resumable training state (tensors, numbers, strings, dicts, lists only)."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_training_state(path: str | Path) -> dict[str, Any]:
    """Read a training state with ``weights_only=True`` (no code is unpickled)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataFileError(f"training state {path} does not exist") from None
    except Exception as exc:
        raise DataFileError(f"training state {path} is corrupt ({type(exc).__name__}: {exc})") from None
