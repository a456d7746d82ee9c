"""Fixtures of the plan tests: a DICOM CT series built here with pydicom."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import one_torch_thread, phantom_hu, write_dicom_ct


@pytest.fixture(scope="session")
def dicom_ct(tmp_path_factory) -> Path:
    return write_dicom_ct(tmp_path_factory.mktemp("ct") / "series", phantom_hu())


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread for every plan test (after the suite's default of two): see helpers.one_torch_thread."""
    with one_torch_thread():
        yield
