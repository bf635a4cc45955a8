"""MCGMState: installing on a base, adapters, state dicts, the artifact both ways, removing itself."""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer

from lowmcgm.config import LoraConfig, TrainConfig
from lowmcgm.handles import HandleEmbedding
from lowmcgm.mcgm import MCGMState
from lowmcgm.models.tiny import build_tiny_base

HANDLES = ["<asset0>", "<asset1>"]
LORA = LoraConfig(rank=4, alpha=2.0, use_text_encoder_lora=True)


def _outputs(base, prompt: str = "a photo of <asset0> and <asset1>") -> tuple[torch.Tensor, torch.Tensor]:
    """Text-encoder states of ``prompt`` (unknown words are fine) and the UNet's output on them."""
    ids = base.tokenizer([prompt], padding="max_length", max_length=base.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    gen = torch.Generator().manual_seed(0)
    size = base.unet.config.sample_size
    latents = torch.randn(1, base.unet.config.in_channels, size, size, generator=gen)
    with torch.no_grad():
        text = base.text_encoder(ids)[0]
        return text, base.unet(latents, torch.tensor([500]), text).sample


def _trained_state(base) -> MCGMState:
    """A state whose every part differs from its initialisation (LoRA up-weights start at zero)."""
    state = MCGMState.install(base, HANDLES, ["dog", "cat"], use_mask_tokens=True, seed=0)
    state.add_adapters(base, LORA, "cpu")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in [state.handles.vectors, *state.unet_params, *state.text_encoder_params,
                      *state.mask_encoder.parameters()]:
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
    return state


def test_install_freezes_the_base_and_trains_only_the_state():
    base = build_tiny_base("tiny")
    state = MCGMState.install(base, HANDLES, ["dog", "cat"], use_mask_tokens=True, seed=0)
    trainable = {p for group in state.parameter_groups(1, TrainConfig()) for p in group["params"]}
    assert trainable == {state.handles.vectors, *state.mask_encoder.parameters()}
    assert not any(p.requires_grad for m in (base.unet, base.vae) for p in m.parameters())
    assert isinstance(base.text_encoder.get_input_embeddings(), HandleEmbedding)
    state.add_adapters(base, LORA, "cpu")
    groups = state.parameter_groups(2, TrainConfig(lora_lr=3e-4))
    assert [g["lr"] for g in groups][-2] == 3e-4 and state.unet_params and state.text_encoder_params
    assert state.lora["rank"] == 4 and state.lora["text_encoder_targets"]


def test_state_dict_round_trips_into_a_fresh_state():
    base, other = build_tiny_base("tiny"), build_tiny_base("tiny")
    state = _trained_state(base)
    copy = MCGMState.install(other, HANDLES, ["dog", "cat"], use_mask_tokens=True, seed=0)
    copy.add_adapters(other, LORA, "cpu")
    assert not torch.equal(_outputs(base)[1], _outputs(other)[1])
    copy.load_state_dict(other, state.state_dict(base))
    for a, b in zip(_outputs(base), _outputs(other)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    masks = torch.zeros(1, 2, 64, 64)
    masks[:, 0, 10:30, 10:40] = 1
    torch.testing.assert_close(state.mask_encoder(masks), copy.mask_encoder(masks), rtol=0, atol=0)


def test_remove_leaves_the_base_computing_as_loaded():
    base, fresh = build_tiny_base("tiny"), build_tiny_base("tiny")
    prompt = "a photo of a dog"  # words the fresh base knows too
    expected = _outputs(fresh, prompt)
    state = _trained_state(base)
    assert not torch.equal(_outputs(base, prompt)[1], expected[1])  # the LoRA does change the UNet
    state.remove(base)
    for got, want in zip(_outputs(base, prompt), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not any(isinstance(m, LoraLayer) for model in (base.unet, base.text_encoder) for m in model.modules())
    assert not hasattr(base.unet, "peft_config")
    assert type(base.text_encoder.get_input_embeddings()) is torch.nn.Embedding
    assert not any(p.requires_grad for p in base.unet.parameters())


def test_artifact_round_trip_on_a_fresh_base_and_on_the_same_base():
    base = build_tiny_base("tiny")
    state = _trained_state(base)
    live = _outputs(base)
    artifact = state.to_artifact(base, {"base_model": "tiny"})
    assert artifact.meta["lora"]["rank"] == 4 and artifact.meta["base_model"] == "tiny"
    assert artifact.text_encoder_lora and artifact.unet_lora and artifact.mask_encoder
    fresh = build_tiny_base("tiny")
    MCGMState.from_artifact(fresh, artifact)
    for a, b in zip(_outputs(fresh), live):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    state.remove(base)  # `lowmcgm run`: train, remove, then sample from the artifact on one base
    again = MCGMState.from_artifact(base, artifact)
    for a, b in zip(_outputs(base), live):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not any(p.requires_grad for p in again.mask_encoder.parameters())


def test_encoder_options_round_trip_through_the_artifact_file(tmp_path):
    """The LayerNorm and the input mode travel as format 2; the paper's encoder stays format 1."""
    from lowmcgm.artifact import load_artifact, read_header, save_artifact

    masks = torch.zeros(1, 2, 64, 64)
    masks[:, 0, 10:30, 10:40] = 1
    for options, version in (({}, "1"), ({"mask_encoder_input": "area_normalized"}, "2"),
                             ({"mask_encoder_input": "area_normalized", "mask_token_norm": "layernorm"}, "2")):
        base = build_tiny_base("tiny")
        state = MCGMState.install(base, HANDLES, ["dog", "cat"], use_mask_tokens=True, seed=0, **options)
        with torch.no_grad():
            for param in state.mask_encoder.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
        path = tmp_path / f"v{len(options)}.safetensors"
        save_artifact(state.to_artifact(base, {"base_model": "tiny", "text_width": 32}), path, dtype="fp32")
        _, meta = read_header(path)
        assert meta["format_version"] == version
        assert {k: meta[k] for k in options if k in meta} == options
        artifact = load_artifact(path)
        state.remove(base)
        loaded = MCGMState.from_artifact(build_tiny_base("tiny"), artifact)
        torch.testing.assert_close(loaded.mask_encoder(masks), state.mask_encoder(masks), rtol=0, atol=0)
