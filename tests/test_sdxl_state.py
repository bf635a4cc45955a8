"""SDXL's handles live in both text encoders: installed, trained, saved, loaded and removed together."""

from __future__ import annotations

import pytest
import torch

from lowmcgm.artifact import load_artifact, read_header, save_artifact
from lowmcgm.config import TrainConfig
from lowmcgm.errors import UserError
from lowmcgm.mcgm import MCGMState
from lowmcgm.models.text_conditioning import encode_sdxl_text
from lowmcgm.models.tiny import build_tiny_base

HANDLES = ["<asset0>", "<asset1>"]
PROMPT = "a photo of <asset0> and <asset1>"


def _ids(tokenizer, text=PROMPT):
    return tokenizer([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def _context(base, text=PROMPT):
    return encode_sdxl_text(base, _ids(base.tokenizer, text), _ids(base.tokenizer_2, text))


def test_handles_go_into_both_encoders_from_each_ones_own_table():
    base = build_tiny_base("tiny-xl")
    dog_2 = base.text_encoder_2.get_input_embeddings().weight[
        base.tokenizer_2("dog", add_special_tokens=False).input_ids[0]].clone()
    state = MCGMState.install(base, HANDLES, ["dog", ""], use_mask_tokens=True, seed=0)
    assert len(state.handle_sets) == 2 and state.handle_sets[1].vectors.shape == (2, 32)
    torch.testing.assert_close(state.handle_sets[1].vectors[0], dog_2.float(), rtol=0, atol=0)
    assert state.mask_encoder.proj.out_features == base.text_width == 64  # the concatenated context
    ids_2 = base.tokenizer_2.convert_tokens_to_ids(HANDLES)
    assert _ids(base.tokenizer_2)[0].tolist().count(ids_2[0]) == 1
    # Phase 1 trains both encoders' rows, and the loss reaches both through the context.
    group = state.parameter_groups(1, TrainConfig())[0]
    assert [p.shape for p in group["params"]] == [(2, 32), (2, 32)]
    text = _context(base)
    (text.context.square().sum() + text.pooled.square().sum()).backward()
    assert state.handles.vectors.grad.abs().sum() > 0 and state.handle_sets[1].vectors.grad.abs().sum() > 0
    trainable = [name for name, p in base.text_encoder_2.named_parameters() if p.requires_grad]
    assert trainable == ["text_model.embeddings.token_embedding.vectors"]  # only the handles' rows


def test_sdxl_state_round_trips_through_the_artifact_and_comes_off_again(tmp_path):
    base = build_tiny_base("tiny-xl")
    with torch.no_grad():
        plain = _context(base, "a photo of a dog")
    state = MCGMState.install(base, HANDLES, ["dog", "cat"], use_mask_tokens=True, seed=0)
    with torch.no_grad():  # as if trained: both encoders' rows move
        for wrapper in state.handle_sets:
            wrapper.vectors.add_(0.1 * torch.randn(wrapper.vectors.shape, generator=torch.Generator().manual_seed(3)))
        trained = _context(base)
    path = tmp_path / "xl.safetensors"
    save_artifact(state.to_artifact(base, {"base_model": "tiny-xl", "text_width": base.text_width}), path,
                  dtype="fp32")
    assert read_header(path)[1]["format_version"] == "3"
    artifact = load_artifact(path)
    assert artifact.text_width == 64 and artifact.handle_vector_sets[1].shape == (2, 32)
    assert set(state.state_dict(base)) >= {"handles.vectors", "handles.vectors_2"}

    state.remove(base)
    with torch.no_grad():  # the base computes as loaded again
        torch.testing.assert_close(_context(base, "a photo of a dog").context, plain.context, rtol=0, atol=0)
    loaded = MCGMState.from_artifact(base, artifact)  # the same loaded base: its handle tokens are reused
    with torch.no_grad():
        again = _context(base)
    torch.testing.assert_close(again.context, trained.context, rtol=0, atol=0)
    torch.testing.assert_close(again.pooled, trained.pooled, rtol=0, atol=0)
    loaded.remove(base)
    fresh = MCGMState.from_artifact(build_tiny_base("tiny-xl"), artifact)  # and on a freshly loaded one
    assert len(fresh.handle_sets) == 2


def test_an_artifact_meets_only_a_base_of_its_family(tmp_path):
    sd = build_tiny_base("tiny")
    state = MCGMState.install(sd, HANDLES, [], use_mask_tokens=False, seed=0)
    path = tmp_path / "sd.safetensors"
    save_artifact(state.to_artifact(sd, {"base_model": "tiny", "text_width": sd.text_width}), path)
    assert read_header(path)[1]["format_version"] == "1"  # SD artifacts are written as before
    with pytest.raises(UserError, match="different families"):
        MCGMState.from_artifact(build_tiny_base("tiny-xl"), load_artifact(path))


def test_second_rows_that_do_not_add_up_to_the_context_width_are_refused(tmp_path):
    from lowmcgm.artifact import atomic_save

    meta = {"format": "lowmcgm", "format_version": "3", "handles": '["<a>"]', "text_width": "64"}
    for first, second, why in (((1, 32), (1, 40), "handles.vectors must be 1x24"),
                               ((1, 32), (1, 64), "handles.vectors_2 must be 1 rows narrower than 64"),
                               ((1, 32), (2, 32), "handles.vectors_2 must be 1 rows")):
        path = tmp_path / "bad.safetensors"
        atomic_save({"handles.vectors": torch.zeros(first), "handles.vectors_2": torch.zeros(second)}, meta, path)
        with pytest.raises(UserError, match=why):
            load_artifact(path)
