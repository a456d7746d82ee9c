"""The results report: ``dota report`` (one offline HTML page from train / evaluate / bench outputs)
and ``dota view`` (open or serve it).

Imported lazily, so that the writers of those outputs can use :mod:`dota.report.figures` and
:mod:`dota.report.schema` without loading the page code (nor it the writers)."""

from __future__ import annotations

import importlib
from typing import Any

_API = {
    "ReportInputs": "dota.report.inputs",
    "discover_inputs": "dota.report.inputs",
    "build_report": "dota.report.build",
    "find_report": "dota.report.view",
    "serve_report": "dota.report.view",
    "view_report": "dota.report.view",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'dota.report' has no attribute {name!r}")
