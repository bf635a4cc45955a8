"""Mask tokens: shapes, per-sample masks in a batch, zero tokens, appending after the text."""

import torch

from lowmcgm.mask_encoder import MaskEncoder, append_mask_tokens, zero_mask_tokens


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
