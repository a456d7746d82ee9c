"""CT readers and beam's-eye-view resampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dota.data import ct
from dota.errors import DataFileError, InputError

SHARED_CT = Path(__file__).resolve().parents[3] / "shared" / "data" / "ct"


def _ramp_volume(shape=(40, 50, 60), spacing=(2.0, 1.0, 1.5)) -> tuple[np.ndarray, tuple[float, float, float]]:
    """HU linear in the physical coordinates: trilinear resampling reproduces it exactly."""
    z, y, x = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing, strict=True)), indexing="ij")
    return (1.0 * z + 3.0 * y + 5.0 * x).astype(np.float32), spacing


# -- readers ----------------------------------------------------------------------------------------


def test_read_nifti_keeps_spacing_and_orientation(tmp_path: Path) -> None:
    nib = pytest.importorskip("nibabel")
    data = np.random.default_rng(0).integers(-1000, 1500, size=(6, 7, 8)).astype(np.int16)  # (x, y, z)
    affine = np.diag([1.5, 2.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "a.nii.gz")
    vol = ct.read_ct(tmp_path / "a.nii.gz")
    assert vol.hu.shape == (8, 7, 6) and vol.spacing_mm == (3.0, 2.0, 1.5)
    np.testing.assert_array_equal(vol.hu, data.transpose(2, 1, 0))
    # A flipped x axis is brought back to the canonical orientation.
    flipped = np.diag([-1.5, 2.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(data[::-1].copy(), flipped), tmp_path / "b.nii")
    np.testing.assert_array_equal(ct.read_ct(tmp_path / "b.nii").hu, vol.hu)


def test_read_dicom_series_sorts_slices_and_rescales(tmp_path: Path) -> None:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    raw = np.arange(3 * 4 * 5, dtype=np.uint16).reshape(3, 4, 5) * 10
    for k, z in enumerate([5.0, -2.5, 1.25]):  # written out of order, uneven order of files
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(tmp_path / f"s{k}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.Rows, ds.Columns = 4, 5
        ds.PixelSpacing = [0.8, 0.9]
        ds.ImagePositionPatient = [0.0, 0.0, z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.RescaleSlope, ds.RescaleIntercept = 0.5, -1024
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
        order = {-2.5: 0, 1.25: 1, 5.0: 2}[z]
        ds.PixelData = raw[order].tobytes()
        ds.save_as(tmp_path / f"s{k}.dcm", enforce_file_format=True)
    vol = ct.read_ct(tmp_path)
    assert vol.hu.shape == (3, 4, 5)
    assert vol.spacing_mm == pytest.approx((3.75, 0.8, 0.9))
    np.testing.assert_allclose(vol.hu, raw * 0.5 - 1024)
    assert pydicom  # imported for the writer


def test_read_openkbp_csv(tmp_path: Path) -> None:
    flat = np.zeros(4 * 4 * 4)
    flat[[5, 21, 63]] = [1024.0, 2000.0, 5000.0]
    rows = "\n".join(f"{i},{flat[i]}" for i in np.nonzero(flat)[0])
    (tmp_path / "pt_1_ct.csv").write_text(",data\n" + rows + "\n")
    (tmp_path / "pt_1_voxel_dimensions.csv").write_text("3.9\n3.9\n2.5\n")
    vol = ct.read_openkbp_csv(tmp_path / "pt_1_ct.csv", shape=(4, 4, 4))
    expected = (np.clip(flat, 0, 4095) - 1024).reshape(4, 4, 4).transpose(2, 0, 1)
    np.testing.assert_array_equal(vol.hu, expected)
    assert vol.spacing_mm == (2.5, 3.9, 3.9)
    assert vol.hu.min() == -1024.0 and vol.hu.max() == 3071.0


def test_unreadable_sources_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match="no CT"):
        ct.read_ct(tmp_path / "missing.nii.gz")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataFileError, match="not a NIfTI"):
        ct.read_ct(tmp_path / "x.txt")
    (tmp_path / "broken.nii.gz").write_bytes(b"not gzip")
    with pytest.raises(DataFileError, match="cannot read NIfTI"):
        ct.read_ct(tmp_path / "broken.nii.gz")


@pytest.mark.skipif(not SHARED_CT.is_dir(), reason="shared CT data not present")
def test_shared_ct_volumes_read_in_hu() -> None:
    sources = ct.find_ct_sources(SHARED_CT)
    assert len(sources) >= 5
    for src in sources:
        vol = ct.read_ct(src)
        mask = ct.body_mask(vol)
        tissue = vol.hu[mask]
        assert np.percentile(vol.hu, 1) < -900, src  # air around the body
        assert -100 < np.median(tissue[(tissue > -200) & (tissue < 200)]) < 100, src  # soft tissue near 0 HU


# -- beam geometry ----------------------------------------------------------------------------------


def test_beam_frame_is_orthonormal_and_follows_the_convention() -> None:
    d, u, v = ct.beam_frame(0.0, 0.0)
    np.testing.assert_allclose(d, [0, 1, 0], atol=1e-12)
    np.testing.assert_allclose(u, [1, 0, 0], atol=1e-12)
    d90, _, _ = ct.beam_frame(90.0, 0.0)
    np.testing.assert_allclose(d90, [0, 0, -1], atol=1e-12)
    for g, c in [(33.0, 0.0), (120.0, 25.0), (270.0, -30.0), (90.0, 90.0)]:
        frame = np.stack(ct.beam_frame(g, c))
        np.testing.assert_allclose(frame @ frame.T, np.eye(3), atol=1e-12)
    assert ct.beam_frame(90.0, 30.0)[0][0] == pytest.approx(0.5)


@pytest.mark.parametrize(("gantry", "couch"), [(0.0, 0.0), (90.0, 0.0), (37.0, 20.0), (250.0, -15.0)])
def test_extract_block_is_exact_for_a_linear_volume(gantry: float, couch: float) -> None:
    vol, spacing = _ramp_volume()
    entry = np.array([40.0, 20.0, 45.0])
    offset = (1.5, -2.0)
    block = ct.extract_bev_block(vol, spacing, entry, gantry, couch, offset, block_shape=(8, 4, 6),
                                 voxel_mm=(1.0, 1.0, 1.0))
    d, u, v = ct.beam_frame(gantry, couch)
    grad = np.array([1.0, 3.0, 5.0])
    centre = entry + offset[0] * u + offset[1] * v
    i, j, k = 3, 0, 5
    p = centre + (i + 0.5) * d + (j - 1.5) * u + (k - 2.5) * v
    assert block[i, j, k] == pytest.approx(float(grad @ p), abs=1e-3)
    # Along depth the HU grows by the gradient's projection on the beam direction per mm.
    np.testing.assert_allclose(np.diff(block[:, 1, 2]), float(grad @ d), atol=1e-3)


def test_extract_block_fills_air_outside_and_checks_input() -> None:
    vol = np.zeros((10, 10, 10), np.float32)
    block = ct.extract_bev_block(vol, (2.0, 2.0, 2.0), (9.0, -20.0, 9.0), 0.0, 0.0, block_shape=(30, 4, 4))
    assert np.all(block[:5] == -1000.0)  # in front of the volume (y < 0)
    assert np.all(block[12:16] == 0.0)  # inside it
    assert np.all(block[-5:] == -1000.0)  # past it
    with pytest.raises(InputError, match="3-D"):
        ct.extract_bev_block(np.zeros((3, 3)), (1, 1, 1), (0, 0, 0), 0, 0)
    with pytest.raises(InputError, match="spacing"):
        ct.extract_bev_block(vol, (1, 0, 1), (0, 0, 0), 0, 0)


def _phantom_volume() -> ct.CTVolume:
    """A water cylinder along z in air, with a bone rod inside."""
    z, y, x = np.meshgrid(np.arange(30), np.arange(80), np.arange(80), indexing="ij")
    r2 = (y - 40) ** 2 + (x - 40) ** 2
    hu = np.where(r2 < 30**2, 0.0, -1000.0).astype(np.float32)
    hu[(y - 40) ** 2 + (x - 50) ** 2 < 25] = 1200.0
    return ct.CTVolume(hu, (3.0, 2.0, 2.0), "cylinder")


def test_sampled_beamlets_pass_through_the_body() -> None:
    vol = _phantom_volume()
    mask = ct.body_mask(vol)
    for s in range(20):
        pose = ct.sample_beamlet_pose(vol, np.random.default_rng(s), mask=mask, min_path_mm=40.0)
        block = ct.extract_bev_block(vol.hu, vol.spacing_mm, pose.entry_point_mm, pose.gantry_deg, pose.couch_deg,
                                     pose.offset_mm, block_shape=(100, 8, 8))
        axis = block[:, 3:5, 3:5].max(axis=(1, 2))
        first = int(np.argmax(axis > -400))
        assert (axis > -400).sum() * 2.0 >= 30.0, s  # long path through tissue along the spot's axis
        assert first * 2.0 <= 14.0, s  # entrance plane at most ~10 mm of air before the skin
        assert np.hypot(*pose.offset_mm) <= 30.0
    again = ct.sample_beamlet_pose(vol, np.random.default_rng(3), mask=mask)
    assert again == ct.sample_beamlet_pose(vol, np.random.default_rng(3), mask=mask)


def test_body_mask_needs_a_body() -> None:
    with pytest.raises(DataFileError, match="no voxel"):
        ct.body_mask(ct.CTVolume(np.full((4, 4, 4), -1000.0, np.float32), (1.0, 1.0, 1.0), "air"))


def test_geometry_sha256_identifies_blocks() -> None:
    a = np.zeros((2, 3, 4), np.int16)
    assert ct.geometry_sha256(a) == ct.geometry_sha256(a.astype(np.float32))
    b = a.copy()
    b[1, 1, 1] = 1
    assert ct.geometry_sha256(a) != ct.geometry_sha256(b)
