"""Patients, sites and the train / validation / test split of the shipped CT volumes.

Beamlets of one patient never appear in two splits: the split is decided per *patient*, not per file
(the two thorax CTAs are crops of one patient and go together). Sites are the anatomical regions the
sources cover; sampling is balanced per site so that the 15 head-and-neck patients do not starve the
others (``../shared/data/ct/README.md``).

The split of the shipped volumes (:data:`PATIENT_SPLIT`) holds out, for testing, the liver case (upper
abdomen with lung bases), the thorax patient, two head-and-neck patients and one limb sarcoma; for
validation, one more head-and-neck patient and one more sarcoma. Every other source trains, together
with the synthetic phantoms. Issue 9's plans are computed on the test patients (liver, pt_1), which the
default model therefore never sees.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from dota.errors import InputError

#: Splits a source can belong to.
SPLITS: tuple[str, ...] = ("train", "val", "test")

#: Patient id -> split, for the shipped CT volumes. Patients not listed train.
PATIENT_SPLIT: dict[str, str] = {
    "liver_cort": "test",
    "thorax_totalseg": "test",
    "openkbp_pt_1": "test",
    "openkbp_pt_26": "test",
    "sts_022": "test",
    "openkbp_pt_6": "val",
    "sts_005": "val",
}


def _stem(source: str) -> str:
    kind, _, name = source.partition(":")
    if kind == "phantom":
        return f"phantom_{name}"
    return Path(name).name.lower()


def patient_of(source: str) -> str:
    """Patient id of a geometry source (``ct:<path>`` or ``phantom:<kind>``; a bare path counts as CT)."""
    if ":" not in source or re.match(r"^[A-Za-z]:[\\/]", source):
        source = f"ct:{source}"
    if source.startswith("phantom:"):
        return _stem(source)
    name = _stem(source)
    full = source.lower()
    if m := re.match(r"pt_(\d+)_ct\.csv$", name):
        return f"openkbp_pt_{m.group(1)}"
    if m := re.match(r"(sts_\d+)", name):
        return m.group(1)
    if name.startswith("thorax_cta_totalseg"):
        return "thorax_totalseg"
    if "liver_cort" in full:
        return "liver_cort"
    if name.startswith("abdomen_pelvis_totalseg"):
        return "abdomen_pelvis_totalseg"
    return re.sub(r"(\.nii(\.gz)?|\.csv)$", "", name)


def site_of(source: str) -> str:
    """Anatomical site of a source: head_neck, thorax, upper_abdomen, pelvis, limb, phantom or other."""
    patient = patient_of(source)
    if patient.startswith("phantom_"):
        return "phantom"
    if patient.startswith("openkbp_"):
        return "head_neck"
    if patient.startswith("sts_"):
        return "limb"
    return {"thorax_totalseg": "thorax", "liver_cort": "upper_abdomen",
            "abdomen_pelvis_totalseg": "pelvis"}.get(patient, "other")


def split_of(source: str) -> str:
    """``train``, ``val`` or ``test`` for a source (phantoms and unlisted patients train)."""
    return PATIENT_SPLIT.get(patient_of(source), "train")


def select_split(sources: Sequence[str], split: str) -> list[str]:
    """The sources of ``sources`` that belong to ``split``; an error when none does."""
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    kept = [s for s in sources if split_of(s) == split]
    if not kept:
        raise InputError(f"none of the {len(sources)} geometry sources belongs to the {split} split")
    return kept


def site_balanced_order(sources: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Sources grouped by site, sites in first-seen order: ``[(site, [sources...]), ...]``."""
    groups: dict[str, list[str]] = {}
    for s in sources:
        groups.setdefault(site_of(s), []).append(s)
    return list(groups.items())


__all__ = ["PATIENT_SPLIT", "SPLITS", "patient_of", "select_split", "site_balanced_order", "site_of", "split_of"]
