"""The package's exceptions: each carries a one-line message naming the problem."""

from __future__ import annotations


class DotaError(Exception):
    """Base class of every error the package raises on purpose."""


class InputError(DotaError, ValueError):
    """Bad user input: wrong shape or dtype, NaN/inf, out-of-range energy."""


class DataFileError(DotaError, OSError):
    """A missing, corrupt or incompatible data or checkpoint file."""


class EngineUnavailableError(DotaError, RuntimeError):
    """A dose engine that is not installed or cannot run here."""


class TrainingError(DotaError, RuntimeError):
    """Training that cannot go on, e.g. a loss that became NaN or inf."""


class DiskFullError(DataFileError):
    """No space left on the device (or quota) while writing a file; the partial file is removed."""
