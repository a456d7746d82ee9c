"""Saving and loading models without unpickling code.

A model checkpoint is one ``.safetensors`` file: the weights, plus JSON metadata holding the
:class:`~dota.model.DoTAConfig`, the :class:`~dota.model.Normalization` and provenance. Training
state for resuming (optimizer, scheduler, RNG) is a separate ``torch.save`` file read back with
``weights_only=True``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from dota.errors import DataFileError, InputError
from dota.fileio import atomic_write
from dota.model import BASE_ENGINES, PRESETS, DoTA, DoTAConfig, Normalization, init_weights

CHECKPOINT_FORMAT = "dota-checkpoint-1"

#: Bounds a checkpoint's config must keep before any model is built from it: the parameter count (computed
#: from the config alone, without allocating; the paper model has 12.6 M) and the block's sides (the
#: attention mask is (L+1)^2).
MAX_PARAMETERS = 200_000_000
MAX_BLOCK_SHAPE = (4096, 1024, 1024)


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
    out: dict[str, Any] = {"created_by": meta.get("created_by", "")}
    for key, default in (("config", None), ("normalization", None), ("extra", "{}")):
        text = meta.get(key, default)
        if text is None:
            raise DataFileError(f"checkpoint {path} has no '{key}' metadata")
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            raise DataFileError(f"checkpoint {path}: its '{key}' metadata is not valid JSON") from None
        if not isinstance(out[key], dict):
            raise DataFileError(f"checkpoint {path}: its '{key}' metadata is not a JSON object")
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_config_dict(data: dict[str, Any], source: str = "checkpoint") -> DoTAConfig:
    """A :class:`~dota.model.DoTAConfig` from a checkpoint's config, checked field by field (types, bounds
    and :data:`MAX_PARAMETERS`) before anything is allocated.

    Raises
    ------
    DataFileError
        One line naming ``source`` and the first bad field.
    """

    def bad(msg: str) -> DataFileError:
        return DataFileError(f"{source}: config {msg}")

    def ints(name: str, length: int | None, lo: int, hi: int | None = None) -> None:
        v = data.get(name)
        if name not in data:
            return
        if not isinstance(v, list) or (length is not None and len(v) != length) or not v:
            raise bad(f"{name} must be a list of {length or 'some'} integers, got {v!r}")
        if not all(_is_int(x) and x >= lo and (hi is None or x <= hi) for x in v):
            raise bad(f"{name} must hold integers >= {lo}" + (f" and <= {hi}" if hi else "") + f", got {v!r}")

    def integer(name: str, lo: int, hi: int) -> None:
        if name in data and not (_is_int(data[name]) and lo <= data[name] <= hi):
            raise bad(f"{name} must be an integer from {lo} to {hi}, got {data[name]!r}")

    if not isinstance(data, dict):
        raise bad("is not a JSON object")
    bs = data.get("block_shape")
    if "block_shape" in data:
        ints("block_shape", 3, 1)
        over = [f"{v} > {m}" for v, m in zip(bs, MAX_BLOCK_SHAPE) if v > m]
        if over:
            raise bad(f"block_shape {bs} is larger than this package allows ({', '.join(over)})")
    if "voxel_mm" in data:
        v = data["voxel_mm"]
        if not (isinstance(v, list) and len(v) == 3 and all(_is_real(x) and x > 0 for x in v)):
            raise bad(f"voxel_mm must be three positive millimetre values, got {v!r}")
    ints("enc_channels", 3, 1, 65536)
    ints("enc_groups", 3, 1, 65536)
    ints("mlp_dims", None, 1, 1 << 20)
    integer("kernel_size", 1, 31)
    integer("num_heads", 1, 4096)
    integer("head_dim", 1, 1 << 20)
    integer("num_blocks", 1, 1024)
    integer("num_forward", 0, 1 << 20)
    for flag in ("decoder_norm", "base_input"):
        if flag in data and not isinstance(data[flag], bool):
            raise bad(f"{flag} must be true or false, got {data[flag]!r}")
    if "dropout" in data and not (_is_real(data["dropout"]) and 0 <= data["dropout"] < 1):
        raise bad(f"dropout must be in [0, 1), got {data['dropout']!r}")
    for name in ("support_fraction", "support_margin_mm"):
        if name in data and not (_is_real(data[name]) and data[name] >= 0):
            raise bad(f"{name} must be a number >= 0, got {data[name]!r}")
    if "ln_eps" in data and not (_is_real(data["ln_eps"]) and data["ln_eps"] > 0):
        raise bad(f"ln_eps must be positive, got {data['ln_eps']!r}")
    if "base_engine" in data and data["base_engine"] not in BASE_ENGINES:
        raise bad(f"base_engine must be one of {BASE_ENGINES}, got {data['base_engine']!r}")
    try:
        cfg = DoTAConfig.from_dict(data)
    except (InputError, TypeError, ValueError) as exc:
        raise bad(str(exc)) from None
    n = parameter_count(cfg)
    if n > MAX_PARAMETERS:
        raise bad(f"describes a model of {n:,} parameters, more than the {MAX_PARAMETERS:,} this package loads")
    return cfg


def parameter_count(cfg: DoTAConfig) -> int:
    """The number of parameters of ``DoTA(cfg)``, computed from the config without building it."""
    c1, c2, c3 = cfg.enc_channels
    k2 = cfg.kernel_size**2
    d, inner = cfg.d_model, cfg.num_heads * cfg.head_dim
    in_channels = 2 if getattr(cfg, "base_input", False) else 1  # CT, plus the base dose for base_input
    encoder = k2 * (in_channels * c1 + c1 * c2 + c2 * c3) + 2 * (c1 + c2 + c3)
    energy = 2 * d
    positions = cfg.num_tokens * d
    dims = (d, *cfg.mlp_dims)
    mlp = sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))
    block = 4 * d + 4 * d * inner + mlp
    decoder = (c3 * c2 * k2 + c2) + (c2 * c1 * k2 + c1) + (c1 * k2 + 1)
    if cfg.decoder_norm:
        decoder += 2 * (c2 + c1)
    return encoder + energy + positions + cfg.num_blocks * block + decoder


def check_normalization_dict(data: dict[str, Any], source: str = "checkpoint") -> Normalization:
    """A :class:`~dota.model.Normalization` from a checkpoint, refusing NaN, non-positive ``dose_max`` and
    empty or reversed HU and energy ranges (one :class:`DataFileError` line naming ``source``)."""

    def pair(name: str) -> tuple[float, float]:
        v = data.get(name) if isinstance(data, dict) else None
        if not (isinstance(v, list) and len(v) == 2 and all(_is_real(x) for x in v) and v[0] < v[1]):
            raise DataFileError(f"{source}: normalization {name} must be two finite numbers lo < hi, got {v!r}")
        return float(v[0]), float(v[1])

    hu, energy = pair("hu_range"), pair("energy_range_mev")
    if energy[0] < 0:
        raise DataFileError(f"{source}: normalization energy_range_mev {list(energy)} has a negative energy")
    dose_max = data.get("dose_max")
    if not (_is_real(dose_max) and dose_max > 0):
        raise DataFileError(f"{source}: normalization dose_max must be a finite positive number, got {dose_max!r}")
    return Normalization(hu_range=hu, energy_range_mev=energy, dose_max=float(dose_max))


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

    if isinstance(name_or_path, str) and not Path(name_or_path).exists() and Path(name_or_path).suffix == "":
        raise DataFileError(f"{name_or_path!r} is neither a checkpoint file nor a preset "
                            f"({', '.join([DEFAULT_MODEL, *PRESETS])})")
    meta = read_checkpoint_metadata(name_or_path)
    source = f"checkpoint {name_or_path}"
    cfg = check_config_dict(meta["config"], source)
    norm = check_normalization_dict(meta["normalization"], source)
    try:
        state = load_file(str(name_or_path))
    except Exception as exc:
        raise DataFileError(f"checkpoint {name_or_path} has corrupt weights ({exc})") from None
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            raise DataFileError(f"{source}: weight {key} has dtype {tensor.dtype}, not floating point")
        if not bool(torch.isfinite(tensor).all()):
            raise DataFileError(f"{source}: weight {key} contains NaN or inf")
    model = DoTA(cfg, norm)
    model.checkpoint_info = meta
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
