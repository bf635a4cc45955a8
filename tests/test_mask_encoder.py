"""Mask tokens: shapes, per-sample masks in a batch, zero tokens, appending after the text."""

import torch

import pytest

from lowmcgm.mask_encoder import MaskEncoder, append_mask_tokens, compute_token_rms, zero_mask_tokens


def test_one_token_per_mask_with_the_text_width():
    enc = MaskEncoder(text_width=32)
    assert enc.proj.in_features == 64 * 64 and enc.proj.bias is not None
    out = enc(torch.zeros(2, 3, 128, 128))
    assert out.shape == (2, 3, 32)


def test_batch_samples_keep_their_own_masks():
    torch.manual_seed(0)
    enc = MaskEncoder(text_width=8)
    a = torch.zeros(1, 1, 64, 64)
    a[..., :32, :] = 1
    b = torch.zeros(1, 1, 64, 64)
    b[..., :, 40:] = 1
    batched = enc(torch.cat([a, b]))
    torch.testing.assert_close(batched[0], enc(a)[0])
    torch.testing.assert_close(batched[1], enc(b)[0])
    assert not torch.allclose(batched[0], batched[1])


def test_masks_are_resized_nearest_to_64():
    enc = MaskEncoder(text_width=4)
    big = torch.zeros(1, 1, 128, 128)
    big[..., ::2, ::2] = 1  # nearest picks the even pixels: all ones at 64x64
    small = torch.ones(1, 1, 64, 64)
    torch.testing.assert_close(enc(big), enc(small))


def test_zero_tokens_and_appending():
    text = torch.randn(2, 77, 8)
    zeros = zero_mask_tokens(2, 3, 8, text)
    ctx = append_mask_tokens(text, zeros)
    assert ctx.shape == (2, 80, 8) and torch.equal(ctx[:, :77], text) and not ctx[:, 77:].any()
    assert append_mask_tokens(text, None) is text


def _block(side_px):
    m = torch.zeros(1, 1, 64, 64)
    m[..., :side_px, :side_px] = 1
    return m


def test_area_normalized_input_sums_to_one_and_blank_is_the_bias():
    torch.manual_seed(0)
    enc = MaskEncoder(text_width=8, input_mode="area_normalized")
    m = _block(10)
    expected = enc.proj(m.flatten(-2) / 100)
    torch.testing.assert_close(enc(m), expected)
    torch.testing.assert_close(enc(torch.zeros(1, 1, 64, 64))[0, 0], enc.proj.bias)


def test_area_normalized_token_step_does_not_grow_with_the_area():
    """docs/method.md's step-size analysis: one AdamW step moves a binary token by about area x lr, an
    area-normalised one by about lr, whatever the area."""
    def moved(mode, side_px):
        torch.manual_seed(0)
        enc = MaskEncoder(text_width=16, input_mode=mode)
        opt = torch.optim.AdamW(enc.parameters(), lr=1e-3, weight_decay=0.0)
        before = enc(_block(side_px)).detach()
        enc(_block(side_px)).sum().backward()
        opt.step()
        return float((enc(_block(side_px)).detach() - before).pow(2).mean().sqrt())

    assert moved("binary", 40) == pytest.approx(1601e-3, rel=0.05)  # 1600 pixel rows + the bias
    assert moved("binary", 40) > 50 * moved("binary", 5)
    assert moved("area_normalized", 40) == pytest.approx(2e-3, rel=0.05)  # weights + bias: 2 lr
    assert moved("area_normalized", 5) == pytest.approx(moved("area_normalized", 40), rel=0.05)


def test_layernorm_tokens_start_at_the_scale_they_are_given():
    torch.manual_seed(0)
    enc = MaskEncoder(text_width=32, input_mode="area_normalized", output_norm="layernorm")
    enc.init_output_scale(torch.tensor(2.5))
    for side in (3, 20, 60):
        assert float(compute_token_rms(enc(_block(side)))) == pytest.approx(2.5, rel=0.1)
    assert set(enc.state_dict()) == {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}
    with pytest.raises(ValueError):
        MaskEncoder(text_width=4, output_norm="batchnorm")
