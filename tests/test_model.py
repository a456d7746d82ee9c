import numpy as np
import pytest
import torch

from dota import checkpoint
from dota.errors import InputError
from dota.model import PRESETS, DoTA, DoTAConfig, attention_mask, dota_energies


def test_paper_preset_size_and_shapes():
    model = DoTA(DoTAConfig.from_name("paper")).eval()
    n = model.num_parameters()
    assert abs(n - 12.63e6) / 12.63e6 < 0.01, n
    attn = sum(p.numel() for b in model.blocks for p in b.attn.parameters())
    assert abs(attn - 11.94e6) / 11.94e6 < 0.01
    with torch.inference_mode():
        out = model(torch.rand(2, 150, 24, 24), torch.rand(2))
    assert out.shape == (2, 150, 24, 24)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_map_blocks_to_dose(name):
    model = checkpoint.load_model(name, seed=0)
    g = np.full((3, *model.config.block_shape), -1000.0 if name == "tiny" else 0.0, np.float32)
    dose = model.predict(g, np.array([80.0, 150.0, 200.0]))
    assert dose.shape == (3, *model.config.block_shape) and dose.dtype == np.float32
    assert (dose >= 0).all()


def test_causality_first_k_slices_depend_only_on_first_k():
    model = checkpoint.load_model("tiny", seed=3)  # num_forward = 2, 2 blocks
    g = torch.rand(1, 150, 24, 24)
    g2 = g.clone()
    g2[:, 100:] = torch.rand(1, 50, 24, 24)
    e = torch.tensor([0.4])
    with torch.inference_mode():
        a, b = model(g, e), model(g2, e)
    # look-ahead 2 per block, 2 blocks: slices < 100 - 4 cannot see the change
    assert torch.equal(a[:, :96], b[:, :96])
    assert not torch.equal(a[:, 96:100], b[:, 96:100])


def test_attention_mask_look_ahead():
    m = attention_mask(5, 1)
    assert m[0].tolist() == [True, True, False, False, False]
    assert m[4].all()


#: The original repository's hyperparam.json, as it is passed to its models.dota_energies.
ORIGINAL_HYPERPARAMS = {"num_tokens": 151, "input_shape": [24, 24, 1], "projection_dim": [6, 6, 12],
                        "num_heads": 16, "num_transformers": 1, "kernel_size": 5, "causal": True}


def test_compat_constructor_takes_the_original_hyperparams_unchanged():
    model = dota_energies(**ORIGINAL_HYPERPARAMS)
    assert model.config == DoTAConfig.from_name("paper")
    assert model.num_parameters() == DoTA(DoTAConfig.from_name("paper")).num_parameters() == 12_632_937
    assert model.config.num_tokens == 151 and model.config.d_model == 6 * 6 * 12 == model.config.head_dim
    # positional form of the original signature, dropout, and full attention without causality
    assert dota_energies(151, (24, 24, 1), (6, 6, 12), 16, 1, 5, 0.2, True).config == PRESETS["paper"]
    full = dota_energies(**{**ORIGINAL_HYPERPARAMS, "causal": False})
    assert full.config.num_forward == 150 and bool(full.mask.all())
    # other sizes follow the original's rules: depth num_tokens - 1, projection (H/4, W/4, C)
    other = dota_energies(**{**ORIGINAL_HYPERPARAMS, "num_tokens": 41, "input_shape": [8, 8, 1],
                             "projection_dim": [2, 2, 4], "num_heads": 2})
    assert other.config.block_shape == (40, 8, 8) and other.config.d_model == 16 == other.config.head_dim
    assert other.config.mlp_dims == (16, 16) and other.config.enc_channels == (64, 64, 4)


@pytest.mark.parametrize("change, match", [
    ({"projection_dim": [5, 6, 12]}, "must start with input_shape's H/4, W/4 = 6, 6"),
    ({"input_shape": [32, 32, 1]}, "must start with input_shape's H/4, W/4 = 8, 8"),
    ({"projection_dim": 432}, r"a key size of 432 is \[6, 6, 12\]"),
    ({"projection_dim": [6, 6]}, "projection_dim is the encoder's output per slice"),
    ({"projection_dim": [6, 6, 10]}, "multiple of 4"),
    ({"input_shape": [150, 24, 24]}, r"input_shape is one CT slice \(H, W, 1\)"),
    ({"input_shape": [150, 24, 24, 1]}, r"input_shape is one CT slice \(H, W, 1\)"),
    ({"input_shape": [22, 24, 1]}, "multiples of 4"),
    ({"num_tokens": 1}, "num_tokens must be an integer >= 2"),
    ({"num_tokens": 151.0}, "num_tokens must be an integer"),
    ({"num_heads": 0}, "num_heads must be an integer >= 1"),
    ({"kernel_size": 4}, "odd"),
    ({"causal": "yes"}, "causal must be true or false"),
])
def test_compat_constructor_refuses_inconsistent_values(change, match):
    with pytest.raises(InputError, match=match):
        dota_energies(**{**ORIGINAL_HYPERPARAMS, **change})


def test_seed_predict_form_and_errors():
    model = checkpoint.load_model("tiny", seed=0)
    g = np.zeros((2, 150, 24, 24), np.float32)
    e = np.array([100.0, 120.0])
    np.testing.assert_array_equal(model.predict([g, e]), model.predict(g, e))
    with pytest.raises(InputError, match="shape"):
        model.predict(np.zeros((2, 100, 24, 24)), e)
    with pytest.raises(InputError, match="NaN"):
        bad = g.copy()
        bad[1, 3, 4, 5] = np.nan
        model.predict(bad, e)
    with pytest.raises(InputError, match="outside the range"):
        model.predict(g, np.array([100.0, 250.0]))
    with pytest.raises(InputError, match="2 geometries but 3 energies"):
        model.predict(g, np.array([100.0, 120.0, 130.0]))
    with pytest.raises(InputError, match="numeric"):
        model.predict(np.array([["a"]]), e)
    with pytest.raises(InputError, match="unknown model preset"):
        DoTAConfig.from_name("huge")


def test_bad_configs_are_refused():
    with pytest.raises(InputError, match="multiples of 4"):
        DoTAConfig(block_shape=(150, 22, 24))
    with pytest.raises(InputError, match="odd"):
        DoTAConfig(kernel_size=4)
