"""The engine's per-slice encoder and decoder against the model's own modules."""

import pytest
import torch

from dota.inference.kernels import SliceCodec, weights_signature

from .helpers import TOL


@pytest.mark.parametrize("chunk", [3, 32, 200])
@pytest.mark.parametrize("channels_last", [True, False])
def test_codec_equals_model_encoder_and_decoder(paper, tiny, chunk, channels_last):
    torch.manual_seed(0)
    for model in (paper, tiny):
        codec = SliceCodec(model, chunk_slices=chunk, channels_last=channels_last)
        _, h, w = model.config.block_shape
        slices = torch.rand(45, h, w)
        tokens = torch.randn(45, model.config.d_model)
        with torch.inference_mode():
            enc_ref = model.encode(slices[None])[0]
            dec_ref = model.decode(tokens[None])[0]
            enc, dec = codec.encode(slices), codec.decode(tokens)
        assert float((enc - enc_ref).abs().max() / enc_ref.abs().max()) <= TOL
        assert float((dec - dec_ref).abs().max() / dec_ref.abs().max()) <= TOL


def test_weights_signature_tracks_in_place_changes(tiny):
    before = weights_signature(tiny)
    assert weights_signature(tiny) == before
    with torch.no_grad():
        tiny.decoder.out.bias.add_(0.0)
    assert weights_signature(tiny) != before


def test_bad_chunk_is_refused(tiny):
    with pytest.raises(ValueError, match="chunk_slices"):
        SliceCodec(tiny, chunk_slices=0)
