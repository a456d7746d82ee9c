import platform

import pytest
import torch

from dota.inference import runtime


def test_allocator_and_machine_info():
    ok = runtime.configure_allocator()
    info = runtime.machine_info()
    if platform.libc_ver()[0] == "glibc":
        assert ok and info["allocator"]["mmap_threshold_bytes"] >= runtime.MMAP_THRESHOLD_FALLBACK_BYTES
    assert runtime.configure_allocator() == ok  # idempotent
    for key in ("cpu", "cores_available", "torch", "torch_threads", "cpu_flags", "omp_wait_policy", "load_average"):
        assert key in info
    assert info["torch"] == torch.__version__
    assert runtime.peak_rss_bytes() > 10 * 2**20


def test_threads():
    before = torch.get_num_threads()
    try:
        assert runtime.configure_threads(1) == 1 and torch.get_num_threads() == 1
        assert runtime.configure_threads() == runtime.available_cores()
        with pytest.raises(ValueError):
            runtime.configure_threads(0)
    finally:
        torch.set_num_threads(before)
