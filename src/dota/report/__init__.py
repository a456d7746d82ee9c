"""The results report: ``dota report`` (one offline HTML page from train / evaluate / bench outputs)
and ``dota view`` (open or serve it)."""

from dota.report.build import build_report
from dota.report.inputs import ReportInputs, discover_inputs
from dota.report.view import find_report, serve_report, view_report

__all__ = ["ReportInputs", "build_report", "discover_inputs", "find_report", "serve_report", "view_report"]
