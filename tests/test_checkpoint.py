import json
import numpy as np
import pytest
import torch

from dota import checkpoint
from dota.errors import DataFileError, InputError
from dota.fileio import atomic_write
from dota.inference import InferenceEngine
from dota.model import DoTA, DoTAConfig, Normalization


def test_roundtrip_keeps_weights_config_and_normalization(tmp_path):
    model = checkpoint.load_model("tiny", seed=5)
    model.normalization = Normalization(energy_range_mev=(75.0, 210.0), dose_max=3.5)
    path = checkpoint.save_model(model, tmp_path / "m.safetensors", extra={"epoch": 3})
    loaded = checkpoint.load_model(path)
    assert loaded.config == model.config
    assert loaded.normalization == model.normalization
    assert loaded.checkpoint_info["extra"] == {"epoch": 3}
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    g = np.random.default_rng(0).uniform(-1000, 1500, (2, 150, 24, 24)).astype(np.float32)
    np.testing.assert_array_equal(InferenceEngine(model).predict(g, [90.0, 200.0]),
                                  InferenceEngine(loaded).predict(g, [90.0, 200.0]))


def test_preset_seeds_are_reproducible():
    a, b = checkpoint.load_model("tiny", seed=1), checkpoint.load_model("tiny", seed=1)
    c = checkpoint.load_model("tiny", seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))


def test_missing_corrupt_and_mismatched_checkpoints(tmp_path):
    with pytest.raises(DataFileError, match="does not exist"):
        checkpoint.load_model(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(DataFileError, match="corrupt"):
        checkpoint.load_model(bad)
    # a checkpoint of one config loaded into another
    tiny = checkpoint.save_model(checkpoint.load_model("tiny"), tmp_path / "tiny.safetensors")
    with pytest.raises(InputError, match="does not fit"):
        checkpoint.load_state_checked(DoTA(DoTAConfig.from_name("small")), __import__("safetensors.torch").torch.load_file(str(tiny)), "tiny.safetensors")
    # truncated file
    data = tiny.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFileError):
        checkpoint.load_model(cut)


def test_training_state_refuses_pickled_code(tmp_path):
    path = tmp_path / "state.pt"

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, path)
    with pytest.raises(DataFileError, match="corrupt"):
        checkpoint.load_training_state(path)


def test_atomic_write_uses_normal_permissions(tmp_path):
    import os

    path = tmp_path / "f.txt"
    atomic_write(path, lambda t: open(t, "w").write("x"))
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_range_support_survives_a_round_trip_and_bad_values_are_refused(tmp_path):
    from dataclasses import replace

    from dota.checkpoint import check_config_dict, load_model, save_model
    from dota.errors import DataFileError
    from dota.model import PRESETS, DoTA

    cfg = replace(PRESETS["tiny-pb"], support_fraction=1e-3, support_margin_mm=10.0)
    path = save_model(DoTA(cfg), tmp_path / "m.safetensors")
    assert load_model(path).config == cfg
    for bad in ("x", -1.0, float("nan")):
        data = {**json.loads(json.dumps(cfg.to_dict())), "support_fraction": bad}
        with pytest.raises(DataFileError, match="support_fraction"):
            check_config_dict(data)
