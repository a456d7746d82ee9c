"""dota evaluate: metrics per beamlet, per site and per energy band."""

from __future__ import annotations

from pathlib import Path

from dota.evaluate import evaluate
from dota.generate import generate_dataset


def test_evaluate_groups_by_site_and_energy(tmp_path: Path) -> None:
    data = generate_dataset(tmp_path / "ct.h5", engine="analytic", ct="all", phantom="water", n_beamlets=6,
                            energy_range_mev=(70.0, 200.0), seed=2, balance_sites=True, progress=False)
    result = evaluate(data, tmp_path / "eval", engine="analytic", progress=False, plots=False,
                      save_predictions=False)
    summary = result["summary"]
    sites = {r["site"] for r in result["per_beamlet"]}
    assert len(sites) >= 3 and set(summary["by_site"]) == sites
    assert sum(g["beamlets"] for g in summary["by_site"].values()) == 6
    assert sum(g["beamlets"] for g in summary["by_energy"].values()) == 6
    for group in summary["by_site"].values():  # an engine against itself passes everywhere
        assert group["gamma"]["1%/3mm"]["mean"] == 100.0
