"""What the UNet is conditioned on besides the noisy latents, built from prompts for every family.

SD 1.x/2.x condition the UNet on one thing, the text encoder's last hidden states (the context).
SDXL adds two, passed as ``added_cond_kwargs``: the second text encoder's pooled embedding and six
size numbers (``sdxl_conditioning``). Training builds them from token ids, since its prompts hold
handle tokens and its text-encoder outputs may be cached by ids; this module is the one place
that knows which family needs what, so the trainer's forward pass reads the same for both.

Example::

    ids = tokenize_prompts(base, ["a photo of <asset0>"])
    text = encode_prompt_ids(base, ids, device)
    unet(noisy, t, text.context, added_cond_kwargs=unet_added_kwargs(text, time_ids))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


class TextModels(Protocol):
    """What text encoding reads: a ``models.BaseModel``, or a diffusers pipeline built from one
    (sampling encodes with the pipeline's own encoders, which carry the artifact's handles)."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    tokenizer_2: CLIPTokenizer | None  # SDXL's second pair; None for SD 1.x/2.x
    text_encoder_2: CLIPTextModelWithProjection | None


@dataclass
class PromptIds:
    """Token ids of a batch of prompts, from each tokenizer the model has."""

    ids: torch.Tensor  # (B, 77) from base.tokenizer: where the handles sit (the losses read these)
    ids_2: torch.Tensor | None = None  # (B, 77) from SDXL's base.tokenizer_2 (it pads otherwise)

    def key(self, row: int) -> tuple[int, ...]:
        """One prompt's identity, for caches: the first tokenizer's ids say which prompt it is."""
        return tuple(self.ids[row].tolist())

    def __len__(self) -> int:
        return self.ids.shape[0]


@dataclass
class TextStates:
    """The text encoders' outputs for a batch of prompts."""

    context: torch.Tensor  # (B, 77, d): the UNet's encoder_hidden_states (before mask tokens)
    pooled: torch.Tensor | None = None  # (B, p): SDXL's text_embeds; None for SD 1.x/2.x

    @classmethod
    def stack(cls, rows: list[TextStates]) -> TextStates:
        pooled = None if rows[0].pooled is None else torch.cat([r.pooled for r in rows])
        return cls(torch.cat([r.context for r in rows]), pooled)

    def split(self) -> list[TextStates]:
        """One ``TextStates`` per prompt (a cache keeps them by prompt)."""
        pooled = [None] * len(self.context) if self.pooled is None else self.pooled.split(1)
        return [TextStates(c, p) for c, p in zip(self.context.split(1), pooled)]


def tokenize_prompts(base: TextModels, prompts: list[str]) -> PromptIds:
    """Token ids of ``prompts``, padded and cut to each tokenizer's window, on the CPU."""
    ids_2 = tokenize(base.tokenizer_2, prompts) if base.tokenizer_2 is not None else None
    return PromptIds(tokenize(base.tokenizer, prompts), ids_2)


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """(B, 77) ids of ``prompts`` from one tokenizer, as every family's encoding reads them (and
    diffusers' pipelines too): padded and cut to its window."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_prompt_ids(base: TextModels, ids: PromptIds, device: torch.device | str) -> TextStates:
    """The text encoders' outputs as the family's pipeline builds them: SD's last hidden states,
    or SDXL's two penultimate ones concatenated plus the pooled embedding."""
    if base.text_encoder_2 is None:
        return TextStates(base.text_encoder(ids.ids.to(device))[0])
    return encode_sdxl_text(base, ids.ids.to(device), ids.ids_2.to(device))


def encode_sdxl_text(base: TextModels, input_ids: torch.Tensor, input_ids_2: torch.Tensor) -> TextStates:
    """Both encoders' penultimate hidden states, concatenated, and the second's pooled embedding.

    Args:
        input_ids, input_ids_2: (B, 77) ids of the same prompts from ``base.tokenizer`` and
            ``base.tokenizer_2`` (they differ only in padding: ``<|endoftext|>`` and ``!``).
    """
    if base.text_encoder_2 is None:
        raise ValueError("not an SDXL model: it has no second text encoder")
    first = base.text_encoder(input_ids, output_hidden_states=True)
    second = base.text_encoder_2(input_ids_2, output_hidden_states=True)
    # "penultimate": SDXL was trained on the layer before last of both encoders, without their
    # final layer norm; the pooled embedding is the second's projection, which does use it.
    context = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    pooled = pool_at_end_of_text(base.text_encoder_2, second.last_hidden_state, input_ids_2,
                                 base.tokenizer_2.eos_token_id)
    return TextStates(context, pooled)


def pool_at_end_of_text(encoder: CLIPTextModelWithProjection, last_hidden_state: torch.Tensor,
                        input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """SDXL's pooled embedding: the projection of the final hidden state at the first end-of-text token.

    SDXL's ``text_encoder_2/config.json`` keeps the legacy ``eos_token_id`` 2, for which transformers
    pools at ``input_ids.argmax(-1)``, the highest id: a handle's once handles are added (ids past
    the vocabulary), so the words after ``<asset0>`` would never reach SDXL's global conditioning.
    SDXL was trained with, and ComfyUI and A1111 pool at, the first end-of-text token; kohya's
    ``pool_workaround`` (``library/train_util.py``) computes the same.

    Args:
        encoder: the second text encoder (its ``text_projection`` makes the pooled vector).
        last_hidden_state: (B, 77, d) its output after the final layer norm.
        input_ids: (B, 77) the ids it read.
        eos_token_id: the tokenizer's ``<|endoftext|>`` id (49407 on the real vocabulary).

    Returns:
        (B, projection_dim) in ``last_hidden_state``'s dtype.
    """
    position = (input_ids == eos_token_id).int().argmax(dim=-1).to(last_hidden_state.device)  # first one
    rows = torch.arange(last_hidden_state.shape[0], device=last_hidden_state.device)
    at_end = last_hidden_state[rows, position]  # (B, d)
    projection = encoder.text_projection
    return projection(at_end.to(projection.weight.dtype)).to(last_hidden_state.dtype)


@torch.no_grad()
def encode_prompts(base: TextModels, prompts: list[str], device: torch.device | str) -> TextStates:
    """``encode_prompt_ids`` of ``prompts``: the conditioning sampling hands diffusers' pipeline
    (as ``prompt_embeds`` and ``pooled_prompt_embeds``), whose own ``encode_prompt`` would pool
    SDXL's embedding at the highest token id, a handle's."""
    return encode_prompt_ids(base, tokenize_prompts(base, prompts), device)


def unet_added_kwargs(text: TextStates, time_ids: torch.Tensor | None) -> dict[str, torch.Tensor] | None:
    """The UNet's ``added_cond_kwargs`` for ``text``: None for SD 1.x/2.x, SDXL's pooled embedding
    and size numbers (``time_ids``: (6,) for every row, or (B, 6)) otherwise."""
    if text.pooled is None:
        return None
    rows = text.pooled.shape[0]
    time_ids = time_ids.to(text.pooled.device, text.pooled.dtype)
    return {"text_embeds": text.pooled, "time_ids": time_ids.expand(rows, -1) if time_ids.dim() == 1 else time_ids}
