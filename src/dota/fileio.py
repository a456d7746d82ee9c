"""File writing shared by every command: atomic writes (readers never see a half-written file) and the
one rule for ``--out`` (:func:`check_output`), applied before any work is done."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from dota.errors import DataFileError, DiskFullError, InputError

#: ``errno`` values of a full disk or an exhausted quota.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def atomic_write(path: str | Path, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)``, flush the temporary file to disk, then rename it onto ``path``.

    The temporary file lies in the same folder (so the rename is atomic) and gets the usual
    permissions (``0666`` minus the umask) instead of ``mkstemp``'s ``0600``. On any error it is removed;
    a full disk is raised as one :class:`~dota.errors.DataFileError` line naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise _as_data_file_error(exc, path) from None
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, DataFileError) and is_disk_full(exc):
            raise _as_data_file_error(exc, path) from None
        raise


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` reports a full disk or quota (also when h5py only names the errno in its text)."""
    if not isinstance(exc, OSError):
        return False
    if exc.errno in _DISK_FULL:
        return True
    text = str(exc)
    return "No space left on device" in text or "errno = 28," in text or "Disk quota exceeded" in text


def _as_data_file_error(exc: OSError, path: Path) -> DataFileError:
    if is_disk_full(exc):
        return DiskFullError(f"no space left on device while writing {path}; free some space and run again")
    reason = exc.strerror or str(exc)
    return DataFileError(f"cannot write {path}: {reason}")


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def _probe_writable(folder: Path) -> None:
    """Create and remove a file in ``folder``: catches read-only file systems and permissions (even as root)."""
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".dota-probe."):
            pass
    except OSError as exc:
        raise InputError(f"--out: cannot write in {folder} ({exc.strerror or exc})") from None


def check_output(
    out: str | Path,
    *,
    inputs: Iterable[str | Path | None] = (),
    overwrite: bool = False,
    folder: bool = False,
    writes: Sequence[str] = (),
    resumable: bool = False,
) -> Path:
    """The rule every command applies to ``--out`` before doing any work; returns ``out`` as a Path.

    * ``--out`` is never one of the ``inputs`` (nor, for a folder, do any of the files written in it,
      ``writes``, given as names or glob patterns relative to the folder, hit an input);
    * a file output must not be a directory, a folder output must not be a file;
    * an existing output file (for a folder: any existing file matching ``writes``) is replaced only with
      ``overwrite``, unless ``resumable`` (the command has resume semantics of its own and checks its
      folder itself);
    * the place must be writable: the nearest existing folder is probed.

    Raises
    ------
    InputError
        One line naming ``--out`` and the problem.
    """
    out = Path(out).expanduser()
    given = [Path(p).expanduser() for p in inputs if p is not None and str(p) != ""]
    for inp in given:
        if not folder:
            hit = _same(out, inp) or out.resolve() == inp.resolve()
        else:  # the folder may hold inputs; what is written into it must not be one
            hit = False
            for w in writes:
                if _is_pattern(w):
                    hit = hit or (inp.exists() and any(_same(p, inp) for p in out.glob(w)))
                else:
                    target = out / w
                    hit = hit or _same(target, inp) or target.resolve() == inp.resolve() or (
                        target.is_dir() and inp.exists() and _inside(inp, target))
        if hit:
            raise InputError(f"--out {out} would overwrite the input {inp}: choose another output path")
    if out.exists() or out.is_symlink():
        if folder and not out.is_dir():
            raise InputError(f"--out {out} is a file, not a folder: give a folder")
        if not folder and out.is_dir():
            raise InputError(f"--out {out} is a directory: give a file name")
        if not folder and not overwrite and not resumable:
            raise InputError(f"--out {out} exists: pass --overwrite to replace it, or choose another path")
        if folder and not overwrite and not resumable:
            found = sorted({p.name for w in writes for p in (out.glob(w) if _is_pattern(w) else [out / w])
                            if p.exists()})
            if found:
                shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
                raise InputError(f"--out {out} already holds {shown}: pass --overwrite to replace them, "
                                 "or choose another folder")
    place = out if folder and out.is_dir() else out.parent
    while not place.exists():
        place = place.parent
    if not place.is_dir():
        raise InputError(f"--out {out}: {place} is a file, not a folder")
    _probe_writable(place)
    return out


def _is_pattern(name: str) -> bool:
    return any(c in name for c in "*?[")
