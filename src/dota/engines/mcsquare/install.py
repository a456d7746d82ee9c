"""Installing and finding MCsquare: the wheel it ships in, the build this CPU runs, where its data are.

MCsquare's static Linux builds, its material data and the ``UCL_Toshiba`` scanner calibration ship
inside the PyPI wheel ``opentps-core==2.0.0`` (Apache-2.0, OpenTPS consortium). :func:`install_mcsquare`
downloads that wheel with pip, extracts only what MCsquare needs into a cache folder and fixes it
(launcher line endings, run bits). opentps itself is never imported (it pins ``numpy<2``).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from dota.constants import MCSQUARE_WHEEL
from dota.engines.mcsquare.beam_model import beam_model_path
from dota.errors import EngineUnavailableError

#: Folder of the MCsquare files inside the wheel.
_WHEEL_MCSQUARE_DIR = "opentps/core/processing/doseCalculation/protons/MCsquare/"
#: Linux builds, best first, with the /proc/cpuinfo flag each one needs (None: runs anywhere on x86-64).
_BUILDS: tuple[tuple[str, str | None], ...] = (
    ("MCsquare_linux_avx512", "avx512f"),
    ("MCsquare_linux_avx2", "avx2"),
    ("MCsquare_linux_avx", "avx"),
    ("MCsquare_linux_sse4", "sse4_2"),
    ("MCsquare_linux", None),
)
_LAUNCHERS = ("MCsquare",)
_MARKER = "dota-install.txt"
_INSTALL_HINT = "run `dota mcsquare install` (scripts/setup.sh does it)"

#: The scanner calibration of the wheel whose materials the engine uses (``Scanners/<SCANNER>``).
SCANNER = "UCL_Toshiba"


def default_cache_dir() -> Path:
    """``$DOTA_MCSQUARE_DIR``, else ``$DOTA_CACHE/mcsquare``, else ``~/.cache/dota/mcsquare``."""
    if os.environ.get("DOTA_MCSQUARE_DIR"):
        return Path(os.environ["DOTA_MCSQUARE_DIR"]).expanduser()
    if os.environ.get("DOTA_CACHE"):
        return Path(os.environ["DOTA_CACHE"]).expanduser() / "mcsquare"
    return Path.home() / ".cache" / "dota" / "mcsquare"


def _wanted_member(name: str) -> str | None:
    """Path relative to the install folder of a wheel member we keep, or None."""
    if name == "opentps_core-2.0.0.dist-info/LICENSE":
        return "LICENSE-opentps-core.txt"
    if not name.startswith(_WHEEL_MCSQUARE_DIR) or name.endswith("/"):
        return None
    rel = name[len(_WHEEL_MCSQUARE_DIR) :]
    top = rel.split("/", 1)[0]
    if top in ("Materials", "Scanners", "BDL") and not rel.endswith(".py"):
        return rel
    if top in {b for b, _ in _BUILDS} or top in _LAUNCHERS:
        return rel
    return None


def install_mcsquare(cache_dir: str | os.PathLike | None = None, *, wheel: str | os.PathLike | None = None,
                     force: bool = False) -> Path:
    """Install MCsquare into ``cache_dir`` (default :func:`default_cache_dir`) and return that folder.

    Downloads ``opentps-core==2.0.0`` with ``pip download --no-deps`` unless ``wheel`` names a local
    copy, keeps the Linux builds, ``Materials/``, ``Scanners/`` and ``BDL/`` (about 75 MB), converts the
    launchers' CRLF line endings and sets run bits. The install is atomic and idempotent.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if (root / _MARKER).is_file() and not force:
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".mcsquare-", dir=root.parent) as tmp:
        tmp_path = Path(tmp)
        if wheel is None:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--ignore-requires-python", "--disable-pip-version-check", "-q", MCSQUARE_WHEEL,
                   "-d", str(tmp_path / "wheel")]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            found = sorted((tmp_path / "wheel").glob("opentps_core-*.whl"))
            if proc.returncode != 0 or not found:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel"]
                raise EngineUnavailableError(f"could not download {MCSQUARE_WHEEL} with pip: {tail[0]}")
            wheel = found[0]
        stage = tmp_path / "mcsquare"
        try:
            with zipfile.ZipFile(wheel) as zf:
                for info in zf.infolist():
                    rel = _wanted_member(info.filename)
                    if rel is None:
                        continue
                    dest = stage / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(dest, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        except (zipfile.BadZipFile, OSError) as exc:
            raise EngineUnavailableError(f"cannot unpack the MCsquare wheel {wheel}: {exc}") from None
        missing = [b for b, _ in _BUILDS if not (stage / b).is_file()]
        if missing or not (stage / "Materials" / "list.dat").is_file():
            raise EngineUnavailableError(f"{wheel} does not contain the MCsquare Linux builds and materials")
        for name in _LAUNCHERS:
            launcher = stage / name
            if launcher.is_file():
                launcher.write_bytes(launcher.read_bytes().replace(b"\r\n", b"\n"))
        for name in [b for b, _ in _BUILDS] + list(_LAUNCHERS):
            path = stage / name
            if path.is_file():
                path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        (stage / _MARKER).write_text(
            f"MCsquare from {MCSQUARE_WHEEL} (Apache-2.0, OpenTPS consortium: UCLouvain and IBA)\n"
            f"installed by dota for {sys.platform}\n"
        )
        old = tmp_path / "old"
        if root.exists():
            os.replace(root, old)
        os.replace(stage, root)
    return root


def select_build(cpuinfo: str | None = None) -> str:
    """Name of the fastest MCsquare build this CPU runs (avx512, avx2, avx, sse4 or plain).

    ``cpuinfo`` is the text of ``/proc/cpuinfo`` (read when not given). Unlike the wheel's launcher,
    AMD CPUs get their vector build too.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
            break
    for build, flag in _BUILDS:
        if flag is None or flag in flags:
            return build
    return _BUILDS[-1][0]


#: What Intel-compiled MCsquare builds print (and exit) on a CPU they refuse, e.g. any AMD CPU for the
#: vector builds: their dispatcher checks the vendor as well as the instruction sets.
_REFUSED_CPU = "Please verify that both the operating system and the processor support"
_RUNNABLE: dict[Path, str] = {}


def runnable_build(root: Path) -> str:
    """The fastest installed build that actually runs here, probed once per process.

    :func:`select_build` reads the CPU flags; the Intel-compiled vector builds also refuse CPUs of other
    vendors with all the flags (seen on AMD EPYC with AVX-512), so each candidate, best first, is started
    on a missing configuration file and the first that gets as far as looking for it is kept.
    """
    root = Path(root)
    if root in _RUNNABLE:
        return _RUNNABLE[root]
    names = [b for b, _ in _BUILDS]
    first = names.index(select_build())
    for build in names[first:]:
        binary = root / build
        if not os.access(binary, os.X_OK):
            continue
        try:
            proc = subprocess.run([str(binary), "dota-probe-no-such-config.txt"], capture_output=True, text=True,
                                  timeout=30, cwd=tempfile.gettempdir())
        except (OSError, subprocess.TimeoutExpired):
            continue
        if _REFUSED_CPU not in proc.stdout + proc.stderr:
            _RUNNABLE[root] = build
            return build
    raise EngineUnavailableError(f"no MCsquare build in {root} runs on this CPU: {_INSTALL_HINT}")


@dataclass(frozen=True)
class MCsquareInstall:
    """Where the pieces of an installed MCsquare are."""

    root: Path
    binary: Path
    materials_dir: Path
    scanner_dir: Path
    beam_model: Path


def find_mcsquare(cache_dir: str | os.PathLike | None = None) -> MCsquareInstall:
    """Locate an installed MCsquare; raise :class:`EngineUnavailableError` with the install command if absent."""
    if sys.platform != "linux":
        raise EngineUnavailableError(f"the MCsquare engine runs on Linux x86-64 only, not {sys.platform}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if not (root / _MARKER).is_file():
        raise EngineUnavailableError(f"MCsquare is not installed in {root}: {_INSTALL_HINT}")
    binary = root / runnable_build(root)
    return MCsquareInstall(
        root=root,
        binary=binary,
        materials_dir=root / "Materials",
        scanner_dir=root / "Scanners" / SCANNER,
        beam_model=beam_model_path(),
    )
