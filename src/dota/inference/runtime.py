"""Process-level settings that decide CPU inference speed, and a record of the machine.

Nothing here runs on import. :func:`configure_runtime` is called by the inference engine on its first
prediction (allocator only) and by ``dota bench`` (allocator and threads). The OpenMP wait policy,
which must be chosen before torch is imported, is set by :func:`dota.bench.set_omp_wait_policy` (see
there for why it matters on a shared machine).

Allocator. With glibc's default dynamic thresholds, activation tensors above the mmap threshold are
served by a fresh ``mmap`` and returned with ``munmap``, so each forward pass page-faults its working
set again; on this project's 2-core machine that doubled the time of a batch-8 pass. The environment
variables ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` would have to be set before the
interpreter starts; instead :func:`configure_allocator` calls glibc's ``mallopt`` through ctypes,
which takes effect for every later allocation of the running process. Measured here (glibc 2.36,
paper model, one thread): page faults per batch-8 pass 410,000 with the defaults, 313,000 with a
32 MiB threshold (the cap of older glibc), none with 1 GiB; CPU time per beamlet 232, 229 and 174 ms.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import resource
import sys
from typing import Any

import torch

#: glibc ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Allocations below this come from the heap and are reused, not mmapped afresh.
MMAP_THRESHOLD_BYTES = 1024 * 1024 * 1024
#: glibc before 2.26 refuses mmap thresholds above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit): the fallback.
MMAP_THRESHOLD_FALLBACK_BYTES = 32 * 1024 * 1024
#: Keep up to this much freed memory instead of returning it to the OS.
TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024

_state: dict[str, Any] = {"allocator": None}


def configure_allocator(
    mmap_threshold_bytes: int = MMAP_THRESHOLD_BYTES, trim_threshold_bytes: int = TRIM_THRESHOLD_BYTES
) -> bool:
    """Raise glibc's mmap and trim thresholds for this process (idempotent).

    Returns True when glibc accepted the settings, False on other C libraries (nothing changed).
    """
    if _state["allocator"] is not None:
        return bool(_state["allocator"])
    settings: dict[str, int] | bool = False
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            for mmap_bytes in (int(mmap_threshold_bytes), MMAP_THRESHOLD_FALLBACK_BYTES):
                if libc.mallopt(_M_MMAP_THRESHOLD, mmap_bytes):
                    if libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold_bytes)):
                        settings = {"mmap_threshold_bytes": mmap_bytes,
                                    "trim_threshold_bytes": int(trim_threshold_bytes)}
                    break
        except (OSError, AttributeError):
            settings = False
    _state["allocator"] = settings
    return bool(settings)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def configure_threads(num_threads: int | None = None) -> int:
    """Set torch's intra-op threads (default: one per available core); returns the number set."""
    n = available_cores() if num_threads is None else int(num_threads)
    if n < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    torch.set_num_threads(n)
    return n


def configure_runtime(num_threads: int | None = None, set_threads: bool = False) -> dict[str, Any]:
    """Tune the allocator and, when ``set_threads``, the thread count; returns what was set."""
    allocator = configure_allocator()
    threads = configure_threads(num_threads) if set_threads else torch.get_num_threads()
    return {"allocator_tuned": allocator, "threads": threads}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The SIMD features that matter for torch on x86 (AVX2, AVX-512, AMX), as listed by the kernel."""
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "amx_int8")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_info() -> dict[str, Any]:
    """CPU, cores, torch version and settings, allocator state: what a benchmark must record."""
    return {
        "cpu": cpu_model(),
        "cores_available": available_cores(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "omp_wait_policy": ", ".join(f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
                                     if k in os.environ) or "default",
        "allocator": _state["allocator"] or "default",
        "load_average": load_average(),
    }


__all__ = [
    "configure_allocator",
    "configure_threads",
    "configure_runtime",
    "available_cores",
    "machine_info",
    "peak_rss_bytes",
]
