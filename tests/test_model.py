import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dota import checkpoint
from dota.errors import InputError
from dota.inference import InferenceEngine
from dota.model import (
    PRESETS,
    DoTA,
    DoTAConfig,
    attention_mask,
    conv_to_one_channel,
    max_pool_2x2,
)
from dota.seed import SeedModel, dota_energies


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
    dose = InferenceEngine(model).predict(g, np.array([80.0, 150.0, 200.0]))
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
    model = dota_energies(**ORIGINAL_HYPERPARAMS).model
    assert model.config == DoTAConfig.from_name("paper")
    assert model.num_parameters() == DoTA(DoTAConfig.from_name("paper")).num_parameters() == 12_632_937
    assert dota_energies(**ORIGINAL_HYPERPARAMS).count_params() == 12_632_937
    assert model.config.num_tokens == 151 and model.config.d_model == 6 * 6 * 12 == model.config.head_dim
    # positional form of the original signature, dropout, and full attention without causality
    assert dota_energies(151, (24, 24, 1), (6, 6, 12), 16, 1, 5, 0.2, True).model.config == PRESETS["paper"]
    full = dota_energies(**{**ORIGINAL_HYPERPARAMS, "causal": False}).model
    assert full.config.num_forward == 150 and bool(full.mask.all())
    # other sizes follow the original's rules: depth num_tokens - 1, projection (H/4, W/4, C)
    other = dota_energies(**{**ORIGINAL_HYPERPARAMS, "num_tokens": 41, "input_shape": [8, 8, 1],
                             "projection_dim": [2, 2, 4], "num_heads": 2}).model
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
    model = SeedModel(checkpoint.load_model("tiny", seed=0))
    g = np.zeros((2, 150, 24, 24), np.float32)
    e = np.array([100.0, 120.0])
    np.testing.assert_array_equal(model.predict([g, e]), model.predict(g, e))
    with pytest.raises(InputError, match=r"\[geometry_hu, energies_mev\]"):
        model.predict(g)
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


def test_encoder_and_decoder_rewrites_equal_the_textbook_layers():
    """The model's pooling and last convolution are exact rewrites; compare them and the whole encoder and
    decoder with torch's own layers (max_pool2d, conv2d), in both memory layouts."""
    torch.manual_seed(0)
    x = torch.randn(7, 64, 12, 12)
    assert torch.equal(max_pool_2x2(x), F.max_pool2d(x, 2))
    w, b = torch.randn(1, 64, 5, 5), torch.randn(1)
    ref = F.conv2d(x, w, b, padding=2)[:, 0]
    for fmt in (torch.contiguous_format, torch.channels_last):
        out = conv_to_one_channel(x.contiguous(memory_format=fmt), w, b, 2)
        assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    for name in ("paper", "small-pb"):
        model = checkpoint.load_model(name, seed=1)
        enc, dec = model.encoder, model.decoder
        _, h, w_ = model.config.block_shape
        slices = torch.rand(9, enc.in_channels, h, w_)
        tokens = torch.randn(9, model.config.d_model)
        with torch.inference_mode():
            y = slices
            for i, (conv, norm) in enumerate(((enc.conv1, enc.norm1), (enc.conv2, enc.norm2), (enc.conv3, enc.norm3))):
                y = norm(conv(y))
                y = F.relu(F.max_pool2d(y, 2) if i < 2 else y)
            enc_ref = y.permute(0, 2, 3, 1).flatten(1)
            gh, gw, gc = dec.grid
            z = tokens.reshape(-1, gh, gw, gc).permute(0, 3, 1, 2)
            for up, norm in ((dec.up1, dec.norm1), (dec.up2, dec.norm2)):
                z = up(z)
                z = F.relu(z if norm is None else norm(z))
            dec_ref = dec.out(z)[:, 0]
            for fmt in (torch.contiguous_format, torch.channels_last):
                e_out, d_out = enc(slices, fmt), dec(tokens, fmt)
                assert float((e_out - enc_ref).abs().max()) <= 1e-5 * float(enc_ref.abs().max()), (name, fmt)
                assert float((d_out - dec_ref).abs().max()) <= 1e-5 * float(dec_ref.abs().max()), (name, fmt)
        # where a gradient is taken (training) the model runs torch's layers: the same values
        e_grad, d_grad = enc(slices), dec(tokens)
        assert e_grad.requires_grad and d_grad.requires_grad
        assert float((e_grad.detach() - enc_ref).abs().max()) <= 1e-5 * float(enc_ref.abs().max()), name
        assert float((d_grad.detach() - dec_ref).abs().max()) <= 1e-5 * float(dec_ref.abs().max()), name


def test_encode_and_decode_in_pieces_equal_one_pass(monkeypatch):
    """Without a gradient the model's encode and decode run their slices in pieces (_per_slice): the same
    values as the layers on every slice at once, for a slice count that is not a multiple of the piece."""
    import dota.model as dm

    model = checkpoint.load_model("small-pb", seed=2)
    _, h, w = model.config.block_shape
    geometry = torch.rand(3, 37, 2, h, w)
    tokens = torch.randn(3, 37, model.config.d_model)
    calls = []
    encoder_forward = model.encoder.forward

    def counted(x, fmt=torch.contiguous_format):
        calls.append(x.shape[0])
        return encoder_forward(x, fmt)

    monkeypatch.setattr(model.encoder, "forward", counted)
    monkeypatch.setattr(dm, "INFERENCE_SLICE_CHUNK", 16)
    with torch.inference_mode():
        for fmt in (torch.contiguous_format, torch.channels_last):
            calls.clear()
            enc = model.encode(geometry, fmt)
            assert calls == [16] * 6 + [15], calls  # 111 slices in pieces of 16
            whole = encoder_forward(geometry.reshape(-1, 2, h, w), fmt).view(3, 37, -1)
            assert torch.equal(enc, whole), fmt
            dec = model.decode(tokens, fmt)
            assert torch.equal(dec, model.decoder(tokens.reshape(-1, tokens.shape[-1]), fmt).view(3, 37, h, w)), fmt
    calls.clear()
    model.encode(geometry)  # with a gradient: one pass over every slice
    assert calls == [111]


def test_block_pieces_compose_to_the_block():
    """keys_values + finish (what the incremental decoder caches and resumes) give the block's own rows."""
    model = checkpoint.load_model("tiny", seed=4)  # look-ahead 2
    block = model.blocks[0]
    x = torch.randn(2, 20, model.config.d_model)
    mask = attention_mask(20, model.config.num_forward)
    with torch.inference_mode():
        ref = block(x, mask)
        k, v = block.keys_values(x)
        rows = block.finish(x[:, 5:9], k, v, mask[5:9])
    assert float((rows - ref[:, 5:9]).abs().max()) <= 1e-6 * float(ref.abs().max())


def test_the_model_does_not_know_how_it_is_run():
    """dota.model imports nothing from dota.inference: the runner holds the model, never the reverse."""
    import subprocess
    import sys

    code = ("import sys, dota.model; bad = sorted(m for m in sys.modules if m.startswith('dota.inference')); "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
