import h5py
import numpy as np
import pytest

from dota.constants import DOSE_UNIT
from dota.data.hdf5 import BeamletFile, import_original_dota, read_dataset, write_dataset
from dota.errors import DataFileError, InputError
from tests.conftest import TEST_ATTRS, synthetic_beamlets


def test_roundtrip_with_attrs_meta_and_uncertainty(tmp_path):
    g, e, d = synthetic_beamlets(3)
    unc = np.full(3, 0.02, np.float32)
    meta = {"seed": np.arange(3), "source": np.array(["water", "slab", "ct:liver"])}
    path = write_dataset(tmp_path / "x.h5", g, d, e, attrs=TEST_ATTRS, meta=meta, uncertainty=unc)
    data = read_dataset(path)
    np.testing.assert_array_equal(data.geometry, g)
    np.testing.assert_array_equal(data.dose, d)
    np.testing.assert_array_equal(data.energy, e)
    assert data.meta["source"].tolist() == ["water", "slab", "ct:liver"]
    assert data.attrs["dose_unit"] == DOSE_UNIT and data.attrs["format_version"] == 1
    assert data.voxel_mm == (2.0, 2.0, 2.0)
    with h5py.File(path) as f:
        assert f["geometry"].dtype == np.int16 and f["geometry"].chunks == (1, 150, 24, 24)
        assert f["dose"].compression == "gzip"
    with BeamletFile(path) as f:
        assert len(f) == 3 and f.block_shape == (150, 24, 24)
        sub = f.load([2, 0])
        np.testing.assert_array_equal(sub.energy, e[[0, 2]])


def test_write_refuses_bad_input(tmp_path):
    g, e, d = synthetic_beamlets(2)
    with pytest.raises(InputError, match="dose shape"):
        write_dataset(tmp_path / "a.h5", g, d[:, :10], e, attrs=TEST_ATTRS)
    bad = d.copy()
    bad[0, 0, 0, 0] = np.inf
    with pytest.raises(InputError, match="NaN or inf"):
        write_dataset(tmp_path / "a.h5", g, bad, e, attrs=TEST_ATTRS)
    with pytest.raises(InputError, match="attributes missing"):
        write_dataset(tmp_path / "a.h5", g, d, e, attrs={"engine": "x"})
    assert not list(tmp_path.iterdir()), "a failed write must leave nothing behind"


def test_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(DataFileError, match="does not exist"):
        BeamletFile(tmp_path / "none.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(DataFileError, match="not a readable HDF5"):
        BeamletFile(junk)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(DataFileError, match="no 'geometry'"):
        BeamletFile(other)
    g, e, d = synthetic_beamlets(2)
    path = write_dataset(tmp_path / "ok.h5", g, d, e, attrs=TEST_ATTRS)
    with h5py.File(path, "a") as f:
        del f.attrs["dose_unit"]
    with pytest.raises(DataFileError, match="dose_unit"):
        BeamletFile(path)


def test_import_original_dota_layout(tmp_path):
    g, e, d = synthetic_beamlets(2)
    # original layout: (25, 25, 150, N) with an extra last row and column
    pad = lambda a: np.pad(a, ((0, 0), (0, 0), (0, 1), (0, 1)), constant_values=7)
    path = tmp_path / "orig.h5"
    with h5py.File(path, "w") as f:
        f["geometry"] = np.transpose(pad(g.astype(np.float32)), (2, 3, 1, 0))
        f["dose0"] = np.transpose(pad(d), (2, 3, 1, 0))
        f["energy0"] = e[None, :]
    with pytest.raises(DataFileError, match="original DoTA layout"):
        BeamletFile(path)
    data = import_original_dota(path, tmp_path / "converted.h5")
    np.testing.assert_array_equal(data.geometry, g)
    np.testing.assert_array_equal(data.dose, d)
    np.testing.assert_array_equal(read_dataset(tmp_path / "converted.h5").energy, e)
