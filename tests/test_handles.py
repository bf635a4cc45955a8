"""Handle tokens: names, one token each, the wrapper trains only handle rows."""

import pytest
import torch

from lowmcgm.errors import UserError
from lowmcgm.handles import check_handle_names, handle_positions, install_handles, load_handles, remove_handle_wrapper
from lowmcgm.models.tiny import build_tiny_base


def test_default_and_custom_names():
    assert check_handle_names([], 2) == ["<asset0>", "<asset1>"]
    assert check_handle_names(["<mydog>", "<cat-1>"], 2) == ["<mydog>", "<cat-1>"]


@pytest.mark.parametrize("names,fragment", [
    (["<a>"], "give one per mask"), (["dog", "<b>"], "not allowed"), (["<a>", "<a>"], "repeat"),
    (["<a b>", "<c>"], "not allowed"), (["<{0}>", "<c>"], "not allowed"),
], ids=["count", "no-brackets", "repeat", "space", "format-string"])
def test_bad_names(names, fragment):
    with pytest.raises(UserError, match=fragment):
        check_handle_names(names, 2)


def test_handles_are_single_tokens_initialised_from_words():
    base = build_tiny_base()
    table = base.text_encoder.get_input_embeddings().weight.detach().clone()
    dog = base.tokenizer("dog", add_special_tokens=False).input_ids[0]
    emb = install_handles(base.tokenizer, base.text_encoder, ["<asset0>", "<asset1>"], ["dog", ""],
                          torch.Generator().manual_seed(0))
    ids = emb.handle_ids.tolist()
    assert base.tokenizer("a photo of <asset0> and <asset1>").input_ids[4:7] == [ids[0], base.tokenizer(
        "and", add_special_tokens=False).input_ids[0], ids[1]]
    torch.testing.assert_close(emb.vectors[0], table[dog])
    assert emb.vectors.requires_grad and not emb.base.weight.requires_grad


def test_wrapper_gives_gradient_to_handle_rows_only():
    base = build_tiny_base()
    emb = install_handles(base.tokenizer, base.text_encoder, ["<asset0>"], [], torch.Generator().manual_seed(0))
    ids = base.tokenizer(["a photo of <asset0>"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    out = base.text_encoder(ids)[0]
    out.sum().backward()
    assert emb.vectors.grad is not None and emb.vectors.grad.abs().sum() > 0
    assert emb.base.weight.grad is None
    # Same output as a plain table holding the vectors.
    remove_handle_wrapper(base.text_encoder, emb)
    with torch.no_grad():
        torch.testing.assert_close(base.text_encoder(ids)[0], out.detach())


def test_name_clash_with_an_existing_token():
    base = build_tiny_base()
    with pytest.raises(UserError, match="already a token"):
        load_handles(base.tokenizer, base.text_encoder, ["dog"], torch.zeros(1, 32))


def test_positions_follow_prompt_order():
    ids = torch.tensor([[1, 5, 9, 7, 2], [1, 7, 3, 5, 2]])
    assert handle_positions(ids, torch.tensor([[5, 7], [5, 7]])).tolist() == [[1, 3], [3, 1]]


def test_load_handles_writes_the_rows():
    base = build_tiny_base()
    vectors = torch.randn(2, 32)
    ids = load_handles(base.tokenizer, base.text_encoder, ["<a0>", "<a1>"], vectors)
    torch.testing.assert_close(base.text_encoder.get_input_embeddings().weight[ids], vectors)
