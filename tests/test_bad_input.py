"""Bad input is refused with one line, and nothing is lost: --out rules, dose units, NaN data and
checkpoints, argument types, a full disk, resumed runs with changed settings, the CLI's last resort, and
the report server."""

from __future__ import annotations

import errno
import http.client
import importlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dota.checkpoint import MAX_PARAMETERS, load_model, parameter_count, save_model
from dota.cli import build_parser, main
from dota.constants import DOSE_UNIT
from dota.data.hdf5 import BeamletFile, DatasetWriter, read_dataset, write_dataset
from dota.errors import DataFileError, DiskFullError, InputError, TrainingError
from dota.generate import generate_dataset, parts_dir_for
from dota.model import PRESETS, DoTA
from dota.train import TrainConfig, train
from tests.conftest import TEST_ATTRS, synthetic_beamlets

SMALL_RUN = {"engine": "analytic", "n_beamlets": 5, "energy_range_mev": (70.0, 110.0), "phantom": "heterogeneous",
             "seed": 3, "group_size": 2, "block_shape": (40, 8, 8), "progress": False}
TRAIN = dict(preset="tiny", epochs=2, batch_size=4, checkpoint_every=2, validate_cache_beamlets=0)
#: the module (``dota.evaluate`` on the package is the function of that name)
EVALUATE = importlib.import_module("dota.evaluate")


@pytest.fixture(scope="module")
def two_h5(tmp_path_factory) -> Path:
    """Two beamlets in the tiny preset's block: quick to predict."""
    path = tmp_path_factory.mktemp("two") / "two.h5"
    g, e, d = synthetic_beamlets(2, seed=4)
    return write_dataset(path, g, d, e, attrs=TEST_ATTRS)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def _tmp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


# -- --out: one rule for every command ---------------------------------------------------------------------


def test_predict_never_replaces_its_input(small_h5, tmp_path, capsys):
    data = tmp_path / "F.h5"
    shutil.copy(small_h5, data)
    before = read_dataset(data).dose
    assert main(["predict", str(data), "--model", "tiny", "--out", str(data), "--no-progress"]) == 2
    assert "would overwrite the input" in _one_line_error(capsys)
    # not with --overwrite either, nor through a symbolic link to it
    link = tmp_path / "link.h5"
    link.symlink_to(data)
    assert main(["predict", str(data), "--model", "tiny", "--out", str(link), "--overwrite", "--no-progress"]) == 2
    assert "would overwrite the input" in _one_line_error(capsys)
    np.testing.assert_array_equal(read_dataset(data).dose, before)


def test_existing_outputs_need_overwrite_and_directories_are_refused(two_h5, tmp_path, capsys):
    out = tmp_path / "p.h5"
    out.write_bytes(b"keep me")
    assert main(["predict", str(two_h5), "--model", "tiny", "--out", str(out), "--no-progress"]) == 2
    assert "exists: pass --overwrite" in _one_line_error(capsys)
    assert out.read_bytes() == b"keep me"
    assert main(["predict", str(two_h5), "--model", "tiny", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "is a directory" in _one_line_error(capsys)
    assert main(["predict", str(two_h5), "--model", "tiny", "--out", str(out), "--overwrite", "--no-progress",
                 "--device", "cpu"]) == 0
    assert len(read_dataset(out)) == 2
    gen = ["generate", "--phantom", "water", "--energies", "70,90", "--block-shape", "40x8x8", "--out", str(out),
           "--no-progress"]
    assert main(gen) == 2
    assert "exists: pass --overwrite" in _one_line_error(capsys) and len(read_dataset(out)) == 2
    assert main([*gen, "--overwrite"]) == 0
    assert read_dataset(out).attrs["engine"] == "analytic"


@pytest.fixture
def evaluated(tmp_path):
    data = generate_dataset(tmp_path / "ref.h5", **SMALL_RUN)
    ev = tmp_path / "eval"
    assert main(["evaluate", str(data), "--engine", "analytic", "--out", str(ev), "--no-progress"]) == 0
    return data, ev


def test_folder_outputs_follow_the_same_rule(evaluated, tmp_path, capsys, monkeypatch):
    data, ev = evaluated
    capsys.readouterr()
    stamp = (ev / "metrics.json").stat().st_mtime_ns
    assert main(["evaluate", str(data), "--engine", "analytic", "--out", str(ev), "--no-progress"]) == 2
    assert "already holds" in _one_line_error(capsys) and (ev / "metrics.json").stat().st_mtime_ns == stamp
    # evaluating its own predictions into the same folder would replace them: refused even with --overwrite
    assert main(["evaluate", str(ev / "predictions.h5"), "--engine", "analytic", "--out", str(ev), "--overwrite",
                 "--no-progress"]) == 2
    assert "would overwrite the input" in _one_line_error(capsys)
    assert main(["evaluate", str(data), "--engine", "analytic", "--out", str(ev), "--overwrite", "--no-progress"]) == 0
    capsys.readouterr()

    # report, bench, train and demo: refused before any work is done
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "index.html").write_text("old")
    assert main(["report", "--evaluate", str(ev), "--out", str(tmp_path / "rep")]) == 2
    assert "already holds index.html" in _one_line_error(capsys)
    assert (tmp_path / "rep" / "index.html").read_text() == "old"
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "bench.json").write_text("{}")
    monkeypatch.setattr("dota.bench.run_benchmark", lambda *a, **k: pytest.fail("the benchmark ran"))
    assert main(["bench", "--model", "tiny", "--quick", "--out", str(tmp_path / "bench"), "--no-progress"]) == 2
    assert "already holds bench.json" in _one_line_error(capsys)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["train", str(data), "--out", str(a_file), "--preset", "tiny", "--no-progress"]) == 2
    assert "is a file, not a folder" in _one_line_error(capsys)
    assert main(["demo", "--out", str(a_file), "--no-progress"]) == 2
    assert "is a file, not a folder" in _one_line_error(capsys)
    assert main(["generate", "--phantom", "water", "--energies", "70", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "is a directory" in _one_line_error(capsys)
    # a generate output that is its own --geometry input
    assert main(["generate", "--geometry", str(data), "--out", str(data), "--overwrite", "--block-shape", "40x8x8",
                 "--no-progress"]) == 2
    assert "would overwrite the input" in _one_line_error(capsys)


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder no file can be created in: permissions for a normal user, a read-only tmpfs for root."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("running as root without a way to make a read-only folder")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_read_only_places_are_refused_before_any_work(small_h5, read_only_dir, capsys, monkeypatch):
    monkeypatch.setattr(EVALUATE, "make_engine", lambda *a, **k: pytest.fail("work started"))
    assert main(["predict", str(small_h5), "--model", "tiny", "--out", str(read_only_dir / "p.h5")]) == 2
    assert "cannot write in" in _one_line_error(capsys)
    assert main(["evaluate", str(small_h5), "--out", str(read_only_dir / "new" / "eval")]) == 2
    assert "cannot write in" in _one_line_error(capsys)
    assert main(["generate", "--phantom", "water", "--energies", "70", "--out", str(read_only_dir / "g.h5")]) == 2
    assert "cannot write in" in _one_line_error(capsys)


# -- dose_unit ---------------------------------------------------------------------------------------------


def _with_dose_unit(src: Path, dst: Path, unit: str, factor: float) -> Path:
    shutil.copy(src, dst)
    with h5py.File(dst, "a") as f:
        f["dose"][...] = f["dose"][...] * factor
        f.attrs["dose_unit"] = unit
    return dst


def test_dose_unit_is_read_converted_or_refused(tmp_path):
    from dota.evaluate import evaluate

    ref = generate_dataset(tmp_path / "gy.h5", **SMALL_RUN)
    cgy = _with_dose_unit(ref, tmp_path / "cgy.h5", "cGy per 1e9 primaries", 100.0)
    with BeamletFile(ref) as a, BeamletFile(cgy) as b:
        np.testing.assert_allclose(b.dose[2], a.dose[2], rtol=1e-6)
        assert b.attrs["dose_unit"] == DOSE_UNIT and b.attrs["dose_unit_in_file"] == "cGy per 1e9 primaries"
    per_primary = _with_dose_unit(ref, tmp_path / "pp.h5", "Gy per primary", 1e-9)
    np.testing.assert_allclose(read_dataset(per_primary).dose, read_dataset(ref).dose, rtol=1e-5)
    result = evaluate(cgy, tmp_path / "ev", engine="analytic", progress=False, plots=False, save_predictions=False)
    assert result["summary"]["gamma"]["1%/3mm"]["mean"] == 100.0  # was 37.9 % when cGy was read as Gy
    for unit in ("MeV", "a.u.", "Gy", "Gy per 0 primaries"):
        bad = _with_dose_unit(ref, tmp_path / "bad.h5", unit, 1.0)
        with pytest.raises(DataFileError, match=f"bad.h5: dose_unit '{unit}' is not known"):
            BeamletFile(bad)
    g, e, d = synthetic_beamlets(2, shape=(40, 8, 8))
    with pytest.raises(InputError, match="dose_unit"):
        write_dataset(tmp_path / "w.h5", g, d, e, attrs={**TEST_ATTRS, "dose_unit": "cGy per 1e9 primaries"})


# -- non-finite data, the writer and the reader ----------------------------------------------------------------


def _corrupt(src: Path, dst: Path, edit) -> Path:
    shutil.copy(src, dst)
    with h5py.File(dst, "a") as f:
        edit(f)
    return dst


def test_nan_training_dose_is_refused_naming_the_file(small_h5, tmp_path, capsys):
    bad = _corrupt(small_h5, tmp_path / "nan.h5", lambda f: f["dose"].__setitem__((5, 10, 3, 3), np.nan))
    with pytest.raises(DataFileError, match=r"nan.h5: dose of beamlet\(s\) \[5\] contains NaN"):
        train(bad, tmp_path / "run", TrainConfig(**TRAIN), progress=False)
    assert main(["train", str(bad), "--out", str(tmp_path / "run2"), "--preset", "tiny", "--epochs", "1",
                 "--batch-size", "4", "--no-progress", "--device", "cpu"]) == 2
    assert "nan.h5" in _one_line_error(capsys)
    assert not (tmp_path / "run2" / "best.safetensors").exists()


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_state(small_h5, tmp_path, monkeypatch):
    import torch

    train_module = importlib.import_module("dota.train")
    models: list = []
    real_init = train_module.init_weights
    monkeypatch.setattr(train_module, "init_weights", lambda m, seed=None: models.append(m) or real_init(m, seed))

    def poison(epoch, step):  # after the state of step 2 is saved, the weights go bad
        if (epoch, step) == (0, 3):
            with torch.no_grad():
                models[0].positions.fill_(float("nan"))

    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"training loss became nan at epoch 1, step 4.*after 0 epoch\(s\) "
                                            r"and 2 step\(s\)\) is kept"):
        train(small_h5, run, TrainConfig(**TRAIN), progress=False, on_step=poison)
    state = torch.load(run / "state.pt", weights_only=True)
    assert state["step"] == 2 and all(bool(torch.isfinite(v).all()) for v in state["model"].values())
    assert not (run / "best.safetensors").exists()


@pytest.mark.parametrize("case, match", [
    ("nan_geometry", "geometry contains NaN"),
    ("nan_energy", "energies must be finite and positive"),
    ("zero_energy", "energies must be finite and positive"),
    ("negative_voxel", "voxel size must be three positive"),
    ("nan_voxel", "voxel size must be three positive"),
    ("meta_length", "meta/seed has 1 rows for 2 beamlets"),
    ("meta_scalar", "meta/seed has no rows"),
    ("meta_nan", "meta/gantry_deg contains NaN"),
    ("uncertainty_length", "uncertainty shape"),
    ("uncertainty_nan", "uncertainty must be finite and non-negative"),
    ("uncertainty_negative", "uncertainty must be finite and non-negative"),
    ("text_dose", "dose must be numeric"),
])
def test_writer_refuses_bad_values(tmp_path, case, match):
    g, e, d = synthetic_beamlets(2, shape=(40, 8, 8))
    g = g.astype(np.float32)
    kw: dict = {"attrs": TEST_ATTRS, "voxel_mm": (2.0, 2.0, 2.0)}
    if case == "nan_geometry":
        g[1, 3, 2, 2] = np.nan
    elif case == "nan_energy":
        e[0] = np.nan
    elif case == "zero_energy":
        e[1] = 0.0
    elif case == "negative_voxel":
        kw["voxel_mm"] = (2.0, -2.0, 2.0)
    elif case == "nan_voxel":
        kw["voxel_mm"] = (2.0, np.nan, 2.0)
    elif case == "meta_length":
        kw["meta"] = {"seed": np.arange(1)}
    elif case == "meta_scalar":
        kw["meta"] = {"seed": np.int64(3)}
    elif case == "meta_nan":
        kw["meta"] = {"gantry_deg": np.array([0.0, np.nan])}
    elif case == "uncertainty_length":
        kw["uncertainty"] = np.full(3, 0.01)
    elif case == "uncertainty_nan":
        kw["uncertainty"] = np.array([0.01, np.nan])
    elif case == "uncertainty_negative":
        kw["uncertainty"] = np.array([0.01, -0.5])
    elif case == "text_dose":
        d = np.full(d.shape, "x")
    with pytest.raises(InputError, match=match):
        write_dataset(tmp_path / "out.h5", g, d, e, **kw)
    assert not list(tmp_path.iterdir()), "a refused write leaves nothing behind"


@pytest.mark.parametrize("case, match", [
    ("nan_geometry", r"geometry of beamlet\(s\) \[1\] contains NaN"),
    ("nan_energy", "energies must be finite and positive MeV; beamlet 0"),
    ("negative_energy", "energies must be finite and positive MeV; beamlet 1"),
    ("negative_voxel", "voxel_size_mm must be three positive"),
    ("short_voxel", "voxel_size_mm must be three positive"),
    ("meta_length", "meta/seed has 1 rows for 2 beamlets"),
    ("uncertainty_length", r"uncertainty shape \(3,\)"),
    ("nan_uncertainty", r"uncertainty of beamlet\(s\) \[0\] contains NaN"),
    ("text_energy", "'energy' is not a numeric array"),
])
def test_reader_refuses_what_the_writer_refuses(tmp_path, case, match):
    g, e, d = synthetic_beamlets(2, shape=(40, 8, 8))
    path = write_dataset(tmp_path / "x.h5", g.astype(np.float32), d, e, attrs=TEST_ATTRS, meta={"seed": np.arange(2)},
                         uncertainty=np.full(2, 0.02))
    with h5py.File(path, "a") as f:
        if case == "nan_geometry":
            f["geometry"][1, 0, 0, 0] = np.nan
        elif case == "nan_energy":
            f["energy"][0] = np.nan
        elif case == "negative_energy":
            f["energy"][1] = -70.0
        elif case == "negative_voxel":
            f.attrs["voxel_size_mm"] = [2.0, -2.0, 2.0]
        elif case == "short_voxel":
            f.attrs["voxel_size_mm"] = [2.0, 2.0]
        elif case == "meta_length":
            del f["meta/seed"]
            f["meta/seed"] = np.arange(1)
        elif case == "uncertainty_length":
            del f["uncertainty"]
            f["uncertainty"] = np.full(3, 0.02, np.float32)
        elif case == "nan_uncertainty":
            f["uncertainty"][0] = np.nan
        elif case == "text_energy":
            del f["energy"]
            f["energy"] = np.array([b"a", b"b"])
    with pytest.raises(DataFileError, match=match):
        read_dataset(path)


# -- checkpoints ---------------------------------------------------------------------------------------------


def _crafted(tmp_path: Path, name: str, *, config: dict | None = None, normalization: dict | None = None,
             weights=None) -> Path:
    model = load_model("tiny", seed=0)
    model.normalization.energy_range_mev = (60.0, 230.0)
    good = save_model(model, tmp_path / "good.safetensors")
    with safe_open(str(good), framework="pt") as f:
        meta = dict(f.metadata())
    state = load_file(str(good))
    if config is not None:
        meta["config"] = json.dumps({**json.loads(meta["config"]), **config})
    if normalization is not None:
        meta["normalization"] = json.dumps({**json.loads(meta["normalization"]), **normalization})
    if weights is not None:
        weights(state)
    path = tmp_path / name
    save_file(state, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("kind, match", [
    ("nan_weight", "weight .* contains NaN or inf"),
    ("int_weight", "not floating point"),
    ("dose_max_nan", "dose_max must be a finite positive number"),
    ("dose_max_negative", "dose_max must be a finite positive number"),
    ("energy_range_empty", r"energy_range_mev must be two finite numbers lo < hi, got \[100.0, 100.0\]"),
    ("hu_range_reversed", "hu_range must be two finite numbers lo < hi"),
    ("huge_head_dim", "parameters, more than the 200,000,000"),
    ("huge_block", "block_shape .* is larger than this package allows"),
    ("string_heads", "num_heads must be an integer"),
    ("unknown_field", "unknown DoTAConfig fields"),
])
def test_bad_checkpoints_are_refused_before_the_model_is_built(tmp_path, kind, match):
    import torch

    edits = {
        "nan_weight": {"weights": lambda s: s["positions"].__setitem__((0, 0), float("nan"))},
        "int_weight": {"weights": lambda s: s.__setitem__("positions", s["positions"].to(torch.int32))},
        "dose_max_nan": {"normalization": {"dose_max": float("nan")}},
        "dose_max_negative": {"normalization": {"dose_max": -1.0}},
        "energy_range_empty": {"normalization": {"energy_range_mev": [100.0, 100.0]}},
        "hu_range_reversed": {"normalization": {"hu_range": [3000.0, -1000.0]}},
        "huge_head_dim": {"config": {"head_dim": 1_000_000}},
        "huge_block": {"config": {"block_shape": [10_000_000, 24, 24]}},
        "string_heads": {"config": {"num_heads": "16"}},
        "unknown_field": {"config": {"heads": 3}},
    }
    path = _crafted(tmp_path, f"{kind}.safetensors", **edits[kind])
    built = []
    with pytest.MonkeyPatch.context() as mp:
        real = DoTA.__init__
        mp.setattr(DoTA, "__init__", lambda self, *a, **k: built.append(1) or real(self, *a, **k))
        t = time.perf_counter()
        with pytest.raises(DataFileError, match=f"{kind}.safetensors.*{match}|{match}.*{kind}"):
            load_model(path)
    assert not built and time.perf_counter() - t < 5


def test_parameter_count_from_the_config_alone():
    for name, cfg in PRESETS.items():
        assert parameter_count(cfg) == DoTA(cfg).num_parameters(), name
    assert parameter_count(PRESETS["paper"]) == 12_632_937 < MAX_PARAMETERS


def test_non_finite_model_output_never_reaches_metrics_or_files(two_h5, tmp_path, capsys):
    from dota.evaluate import evaluate

    # finite weights and a finite, positive dose_max, but one so large that every dose overflows
    path = _crafted(tmp_path, "overflow.safetensors", normalization={"dose_max": 1e308})
    with pytest.raises(DataFileError, match="predicted NaN or inf dose for beamlet 0"):
        evaluate(two_h5, tmp_path / "ev", model=str(path), progress=False, plots=False, save_predictions=False,
                 max_beamlets=2, device="cpu")
    assert main(["predict", str(two_h5), "--model", str(path), "--out", str(tmp_path / "p.h5"), "--no-progress",
                 "--device", "cpu"]) == 2
    assert "predicted NaN or inf" in _one_line_error(capsys) and not (tmp_path / "p.h5").exists()


# -- argument types ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["predict", "d.h5", "--out", "o.h5", "--batch-size", "-3"],
    ["predict", "d.h5", "--out", "o.h5", "--batch-size", "0"],
    ["train", "d.h5", "--out", "r", "--epochs", "0"],
    ["train", "d.h5", "--out", "r", "--batch-size", "-1"],
    ["train", "d.h5", "--out", "r", "--lr", "0"],
    ["train", "d.h5", "--out", "r", "--lr", "nan"],
    ["train", "d.h5", "--out", "r", "--lr-halving-epochs", "-1"],
    ["train", "d.h5", "--out", "r", "--val-fraction", "1.5"],
    ["train", "d.h5", "--out", "r", "--ema", "1"],
    ["train", "d.h5", "--out", "r", "--ema", "-0.5"],
    ["train", "d.h5", "--out", "r", "--ring-weight", "-1"],
    ["evaluate", "d.h5", "--out", "e", "--max-beamlets", "0"],
    ["generate", "--phantom", "water", "--energies", "70", "--out", "g.h5", "-n", "0"],
    ["generate", "--phantom", "water", "--energies", "70", "--out", "g.h5", "--workers", "0"],
    ["generate", "--phantom", "water", "--energies", "70", "--out", "g.h5", "--threads", "-2"],
    ["generate", "--phantom", "water", "--energies", "70", "--out", "g.h5", "--primaries", "0"],
    ["generate", "--phantom", "water", "--energies", "70", "--out", "g.h5", "--group-size", "0"],
    ["bench", "--threads", "0"],
    ["bench", "--batch-size", "-8"],
    ["report", "--worst-k", "0"],
    ["view", "--port", "0"],
    ["view", "--port", "-1"],
    ["view", "--port", "70000"],
    ["demo", "--train-minutes", "-1"],
])
def test_zero_and_negative_sizes_counts_threads_and_ports_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert "must be" in capsys.readouterr().err


def test_predict_with_a_negative_batch_size_writes_nothing(small_h5, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dota.cli", "predict", str(small_h5), "--model", "tiny",
                           "--out", str(tmp_path / "p.h5"), "--batch-size", "-3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--batch-size: must be a positive integer, got -3" in proc.stderr
    assert not (tmp_path / "p.h5").exists()


# -- a full disk ---------------------------------------------------------------------------------------------


def test_a_full_disk_during_the_merge_is_one_line_and_leaves_no_temp_file(tmp_path, capsys, monkeypatch):
    out = tmp_path / "g.h5"

    def disk_full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(DatasetWriter, "append", disk_full)
    with pytest.raises(DiskFullError, match="no space left on device while generating .*g.h5: the 5 finished "
                                            "beamlets are kept in .*g.h5.parts; .*--resume"):
        generate_dataset(out, **SMALL_RUN)
    assert not out.exists() and not _tmp_files(tmp_path)
    assert len(list(parts_dir_for(out).glob("group_*.npz"))) == 3
    argv = ["generate", "--engine", "analytic", "--phantom", "heterogeneous", "-n", "5", "--energy-range", "70:110",
            "--seed", "3", "--group-size", "2", "--block-shape", "40x8x8", "--out", str(out), "--no-progress",
            "--resume"]
    assert main(argv) == 2
    assert "no space left on device" in _one_line_error(capsys)
    assert not out.exists() and not _tmp_files(tmp_path)
    monkeypatch.undo()
    assert main(argv) == 0 and len(read_dataset(out)) == 5  # space freed: --resume finishes the same run


def test_a_really_full_disk_is_one_line_and_no_crash(tmp_path):
    """HDF5 crashes the interpreter when it meets ENOSPC itself; the writer must never let it."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("needs root and tmpfs to fill a real file system")
    try:
        script = textwrap.dedent(f"""
            import numpy as np
            from dota.data.hdf5 import write_dataset
            from tests.conftest import TEST_ATTRS
            dose = np.random.default_rng(0).random((16, 40, 24, 24)).astype(np.float32)  # 3.5 MB, incompressible
            write_dataset({str(mnt / 'big.h5')!r}, np.zeros(dose.shape, np.int16), dose, np.full(16, 100.0),
                          attrs=TEST_ATTRS)
        """)
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                              cwd=Path(__file__).parents[1])
        assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])  # an exception, not a segfault (-11)
        assert "DiskFullError: no space left on device while writing" in proc.stderr
        assert "Exception ignored" not in proc.stderr and os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# -- resumed and failed runs ---------------------------------------------------------------------------------


class Interrupt(Exception):
    pass


def test_resume_refuses_changed_settings(small_h5, tmp_path, capsys):
    run = tmp_path / "run"

    def stop(epoch, step):
        if step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(small_h5, run, TrainConfig(**TRAIN), progress=False, on_step=stop)
    base = ["train", str(small_h5), "--out", str(run), "--resume", "--no-progress"]
    assert main([*base, "--epochs", "1"]) == 2  # fewer epochs (more extend the run: tests/test_train.py)
    assert "was started with --epochs 2, not 1" in _one_line_error(capsys)
    assert main([*base, "--preset", "small"]) == 2
    assert "was started with --preset tiny, not small" in _one_line_error(capsys)
    with pytest.raises(InputError, match="--lr 0.001"):
        train(small_h5, run, TrainConfig(**{**TRAIN, "lr": 0.5}), resume=True, progress=False)
    # other data, or a validation file the run did not start with, would train on other beamlets
    assert main([*base, "--val-data", str(small_h5)]) == 2
    assert "was started with --val-data None" in _one_line_error(capsys)
    # what does not change the training (the device) may change; the same settings resume
    assert main([*base, "--epochs", "2", "--preset", "tiny", "--device", "cpu"]) == 0
    assert json.loads((run / "summary.json").read_text())["epochs_done"] == 2
    # a new run in the same folder: refused without --overwrite, the old run's files replaced with it
    fresh = ["train", str(small_h5), "--out", str(run), "--preset", "tiny", "--epochs", "1", "--batch-size", "4",
             "--no-progress", "--device", "cpu"]
    capsys.readouterr()
    assert main(fresh) == 2
    assert "already holds a training run: pass --resume" in _one_line_error(capsys)
    assert main([*fresh, "--overwrite"]) == 0
    assert json.loads((run / "summary.json").read_text())["epochs"] == 1


def test_a_generate_run_that_fails_before_any_part_leaves_nothing_that_blocks_the_next(tmp_path, monkeypatch):
    out = tmp_path / "g.h5"
    monkeypatch.setattr("dota.generate.run_group", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("broke")))
    with pytest.raises(RuntimeError, match="broke"):
        generate_dataset(out, **SMALL_RUN)
    assert not parts_dir_for(out).exists()
    monkeypatch.undo()
    assert len(read_dataset(generate_dataset(out, **SMALL_RUN))) == 5  # the corrected run, no --resume needed


# -- the CLI's last resort -----------------------------------------------------------------------------------


def test_unexpected_errors_are_one_line_and_the_traceback_is_kept_for_verbose(tmp_path, capsys, monkeypatch):
    def broken(*a, **k):
        raise KeyError("first line\nsecond line")

    monkeypatch.setattr(EVALUATE, "evaluate", broken)
    argv = ["evaluate", str(tmp_path / "x.h5"), "--engine", "analytic", "--out", str(tmp_path / "e")]
    assert main(argv) == 1
    err = _one_line_error(capsys)
    assert "KeyError" in err and "first line" in err and "test_bad_input.py" in err and "--verbose" in err
    assert main(["--verbose", *argv]) == 1
    assert "Traceback" in capsys.readouterr().err

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "secret.h5"))

    monkeypatch.setattr(EVALUATE, "evaluate", denied)
    assert main(argv) == 2
    assert "secret.h5: Permission denied" in _one_line_error(capsys)


# -- dota view -----------------------------------------------------------------------------------------------


def test_view_checks_the_host_header_and_lists_no_folders(tmp_path):
    from dota.report.view import serve_report

    (tmp_path / "index.html").write_text("<html>dota report</html>")
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"\x89PNG")
    server, url = serve_report(tmp_path)
    port = server.server_address[1]

    def get(path: str, host: str | None) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.putrequest("GET", path, skip_host=True)
        if host is not None:
            conn.putheader("Host", host)
        conn.endheaders()
        status = conn.getresponse().status
        conn.close()
        return status

    try:
        assert get("/index.html", f"127.0.0.1:{port}") == 200
        assert get("/index.html", f"localhost:{port}") == 200
        assert get("/img/a.png", "localhost") == 200
        assert get("/index.html", f"evil.example:{port}") == 403  # DNS rebinding
        assert get("/index.html", f"127.0.0.1:{port + 1}") == 403
        assert get("/index.html", None) == 403
        assert get("/img/", f"127.0.0.1:{port}") == 404  # no directory listing
    finally:
        server.shutdown()
        server.server_close()


# -- what the README and the help texts say ---------------------------------------------------------------------


def test_seed_and_device_are_where_the_readme_says_and_seed_is_used(two_h5, tmp_path):
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    options = {name: {o for a in p._actions for o in a.option_strings} for name, p in sub.items()}
    seeded = ("train", "evaluate", "predict", "demo", "generate", "bench", "plan", "dose")
    for name in seeded:
        assert "--seed" in options[name], name
    with_device = ("train", "evaluate", "predict", "demo", "plan", "dose")
    for name in with_device:
        assert "--device" in options[name], name
    assert {n for n, o in options.items() if "--seed" in o} == set(seeded)
    assert {n for n, o in options.items() if "--device" in o} == set(with_device)
    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    assert f"`--seed` ({', '.join(seeded)};" in readme
    assert f"`--device` ({', '.join(with_device)})" in readme
    doses = []
    for seed in ("1", "1", "2"):
        out = tmp_path / f"p{len(doses)}.h5"
        assert main(["predict", str(two_h5), "--model", "tiny", "--seed", seed, "--out", str(out), "--no-progress",
                     "--device", "cpu"]) == 0
        doses.append(read_dataset(out).dose)
    np.testing.assert_array_equal(doses[0], doses[1])
    assert not np.array_equal(doses[0], doses[2])


def test_help_texts_print_percent_signs_once(capsys):
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    for name in sub:
        with pytest.raises(SystemExit):
            main([name, "--help"])
        text = capsys.readouterr().out
        assert "%%" not in text, name
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "paper protocol 1%/3mm by default" in text and "e.g. 1%/3mm,2%/2mm" in text
