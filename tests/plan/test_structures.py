"""Structures (RTSTRUCT built here with pydicom, mask images, OpenKBP CSV, spheres) and DVHs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dota.errors import InputError
from dota.plan.doseio import write_itk_image
from dota.plan.dvh import compute_dvh, d_at_volume, write_dvh_csv
from dota.plan.geometry import ct_from_array, read_patient_ct
from dota.plan.structures import Structure, load_structures, sphere_mask

OPENKBP = Path(__file__).resolve().parents[3] / "shared" / "data" / "ct" / "head_neck_openkbp"


def _rtstruct(path: Path, ct, rois: dict[str, list[np.ndarray]]) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "RTSTRUCT"
    ds.StructureSetROISequence, ds.ROIContourSequence = Sequence(), Sequence()
    for n, (name, contours) in enumerate(rois.items(), start=1):
        r = Dataset()
        r.ROINumber, r.ROIName = n, name
        ds.StructureSetROISequence.append(r)
        rc = Dataset()
        rc.ReferencedROINumber = n
        rc.ContourSequence = Sequence()
        for pts in contours:
            c = Dataset()
            c.ContourGeometricType = "CLOSED_PLANAR"
            c.NumberOfContourPoints = len(pts)
            c.ContourData = [float(v) for v in np.asarray(pts).reshape(-1)]
            rc.ContourSequence.append(c)
        ds.ROIContourSequence.append(rc)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def test_rtstruct_contours_rasterise_on_their_slices(tmp_path, dicom_ct):
    ct = read_patient_ct(dicom_ct)  # spacing (2.5, 3, 3), origin (-70.5, -60, -30)
    z = ct.origin_mm[2] + 10 * 2.5
    # square from x -40.5 .. -22.5 (columns 10..16 have centres -40.5..-22.5) and y -30..-12 (rows 10..16)
    square = np.array([[-41.0, -30.5, z], [-22.0, -30.5, z], [-22.0, -11.5, z], [-41.0, -11.5, z]])
    hole = np.array([[-35.0, -24.5, z], [-28.0, -24.5, z], [-28.0, -17.5, z], [-35.0, -17.5, z]])
    path = _rtstruct(tmp_path / "rs.dcm", ct, {"PTV": [square, hole], "Other": [square + [0, 0, 2.5]]})
    (ptv,) = load_structures(f"{path}:PTV", ct)
    expected = np.zeros(ct.shape, bool)
    expected[10, 10:17, 10:17] = True
    expected[10, 12:15, 12:15] = False  # the inner contour cuts a hole (even-odd rule)
    np.testing.assert_array_equal(ptv.mask, expected)
    both = load_structures(str(path), ct)
    assert [s.name for s in both] == ["PTV", "Other"] and both[1].mask[11].sum() == 49
    with pytest.raises(InputError, match="no ROI named 'GTV'; it has Other, PTV"):
        load_structures(f"{path}:GTV", ct)


def test_mask_image_on_another_grid_is_resampled(tmp_path):
    ct = ct_from_array(np.zeros((10, 12, 14)), (2.0, 2.0, 2.0), origin_mm=(0, 0, 0))
    fine = ct_from_array(np.zeros((20, 24, 28)), (1.0, 1.0, 1.0), origin_mm=(-0.5, -0.5, -0.5))
    labels = np.zeros(fine.shape, np.uint8)
    labels[4:12, 6:14, 2:10] = 3
    path = write_itk_image(tmp_path / "labels.nii.gz", labels, fine)
    (s,) = load_structures(f"{path}:3", ct)
    assert s.name == "labels_3"
    expected = np.zeros(ct.shape, bool)
    expected[2:6, 3:7, 1:5] = True
    np.testing.assert_array_equal(s.mask, expected)


@pytest.mark.skipif(not (OPENKBP / "pt_1_ct.csv").is_file(), reason="OpenKBP data not present")
def test_openkbp_structure_on_its_ct():
    ct = read_patient_ct(OPENKBP / "pt_1_ct.csv")
    (ptv,) = load_structures(str(OPENKBP / "pt_1_PTV70.csv"), ct)
    assert ptv.name == "PTV70" and ptv.mask.shape == ct.shape == (128, 128, 128)
    assert 1000 < ptv.n_voxels < 200000
    assert np.median(ct.hu[ptv.mask]) > -200  # a target inside the body, not in air


def test_sphere_and_dvh_statistics(tmp_path):
    ct = ct_from_array(np.zeros((20, 20, 20)), (2.0, 2.0, 2.0), origin_mm=(-19, -19, -19))
    m = sphere_mask(ct, (0, 0, 0), 8.0)
    odd = range(-19, 20, 2)  # voxel centres (mm) on each axis
    count = sum(1 for a in odd for b in odd for c in odd if a * a + b * b + c * c <= 64)
    assert m.sum() == count
    dose = np.zeros(ct.shape)
    dose[m] = np.linspace(1.0, 3.0, int(m.sum()))
    h = compute_dvh(dose, Structure("s", m), ct.voxel_volume_mm3, bin_gy=0.01, prescription_gy=2.0)
    assert h.stats["mean_gy"] == pytest.approx(2.0) and h.stats["min_gy"] == 1.0 and h.stats["max_gy"] == 3.0
    assert h.stats["D50_gy"] == pytest.approx(2.0, abs=0.01) and h.stats["D2_gy"] == pytest.approx(2.96, abs=0.01)
    assert h.stats["V95_percent"] == pytest.approx(55.0, abs=0.5) and h.stats["volume_cc"] == pytest.approx(count * 8 / 1000)
    assert h.volume_percent[0] == 100.0 and h.volume_percent[-1] == 0.0
    assert np.all(np.diff(h.volume_percent) <= 0)
    assert d_at_volume(np.array([5.0, 1.0, 3.0, 2.0]), 50) == 3.0
    table, stats = write_dvh_csv(tmp_path / "dvh.csv", [h])
    assert table.read_text().splitlines()[0] == "dose_gy,s_volume_percent" and stats.name == "dvh_stats.csv"
    with pytest.raises(InputError, match="holds no voxel"):
        compute_dvh(dose, Structure("empty", np.zeros(ct.shape, bool)), 8.0)
