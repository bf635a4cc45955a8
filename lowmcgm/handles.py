"""Handle tokens: adding them to the tokenizer, initialising them, training only their rows.

The reference trains the whole embedding table and copies every other row back after each step.
Here the table stays frozen and a ``HandleEmbedding`` wrapper substitutes a small trainable fp32
parameter for the handle rows, so no other row can change and the optimizer holds K x d values,
not 49k x d.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

from lowmcgm.errors import UserError

HANDLE_PATTERN = re.compile(r"^<[A-Za-z0-9_\-]{1,32}>$")


def default_handles(num_concepts: int) -> list[str]:
    return [f"<asset{i}>" for i in range(num_concepts)]


def check_handle_names(handles: list[str], num_concepts: int) -> list[str]:
    """Validate user handle names (``<mydog>``); return the list to use."""
    if not handles:
        return default_handles(num_concepts)
    if len(handles) != num_concepts:
        raise UserError(f"{len(handles)} --handle names for {num_concepts} masks: give one per mask, "
                        "or none for <asset0>, <asset1>, ...")
    for h in handles:
        if not HANDLE_PATTERN.match(h):
            raise UserError(f"Handle name {h!r} is not allowed: use <name> with letters, digits, _ "
                            "or - (at most 32), e.g. <mydog>.")
    if len(set(handles)) != len(handles):
        raise UserError(f"Handle names repeat: {', '.join(handles)}.")
    return list(handles)


class HandleEmbedding(nn.Module):
    """A frozen token embedding whose handle rows come from a trainable parameter.

    Args:
        base: the text encoder's token embedding, already resized to hold the handle ids.
        handle_ids: token id of each handle, in handle order.
        vectors: (K, d) initial handle embeddings; kept in fp32 (trainable weights are fp32).
    """

    def __init__(self, base: nn.Embedding, handle_ids: list[int], vectors: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("handle_ids", torch.tensor(handle_ids, dtype=torch.long), persistent=False)
        self.vectors = nn.Parameter(vectors.detach().float().clone())

    @property
    def weight(self) -> torch.Tensor:
        # transformers reads the embedding's weight (dtype, resize): give it the frozen table.
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        emb = self.base(input_ids)  # (B, L, d)
        match = input_ids[..., None] == self.handle_ids.to(input_ids.device)  # (B, L, K)
        picked = match.to(self.vectors.dtype) @ self.vectors  # (B, L, d), zero where no handle
        return torch.where(match.any(-1, keepdim=True), picked.to(emb.dtype), emb)


def _init_vectors(tokenizer: CLIPTokenizer, table: torch.Tensor, init_words: list[str],
                  num: int, generator: torch.Generator) -> torch.Tensor:
    vectors = []
    for i in range(num):
        word = init_words[i] if i < len(init_words) else ""
        if word:
            ids = tokenizer(word, add_special_tokens=False).input_ids
            if not ids:
                raise UserError(f"Initializer word {word!r} has no tokens.")
            # The word's first sub-token, as Break-a-scene does.
            vectors.append(table[ids[0]].float())
        else:
            # No word: the table's mean plus noise of its spread, a typical but distinct token.
            mean, std = table.float().mean(0), table.float().std(0)
            vectors.append(mean + std * torch.randn(table.shape[1], generator=generator))
    return torch.stack(vectors)


def add_handle_tokens(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, handles: list[str]) -> list[int]:
    """Add the handles to the tokenizer and grow the embedding table; return their token ids."""
    vocab = tokenizer.get_vocab()
    taken = [h for h in handles if h in vocab or h.lower() + "</w>" in vocab]
    if taken:
        raise UserError(f"Handle {taken[0]!r} is already a token of this tokenizer: pick another name.")
    tokenizer.add_tokens(handles)
    ids = tokenizer.convert_tokens_to_ids(handles)
    for h, i in zip(handles, ids):
        if tokenizer(h, add_special_tokens=False).input_ids != [i]:
            raise UserError(f"Handle {h!r} does not tokenize to one token; pick a simpler name.")
    # Grow only: a table larger than the tokenizer (a stand-in tokenizer for a real model's
    # architecture, as the memory estimate uses) already has rows for the new ids.
    if len(tokenizer) > text_encoder.get_input_embeddings().weight.shape[0]:
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return ids


def install_handles(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, handles: list[str],
                    init_words: list[str], generator: torch.Generator) -> HandleEmbedding:
    """Add handle tokens and wrap the token embedding so that only handle rows train.

    Example:
        >>> emb = install_handles(tok, te, ["<asset0>"], ["dog"], torch.Generator().manual_seed(0))
        >>> emb.vectors.requires_grad  # the only trainable embedding weights
        True
    """
    ids = add_handle_tokens(tokenizer, text_encoder, handles)
    base = text_encoder.get_input_embeddings()
    base.requires_grad_(False)
    with torch.no_grad():
        # Only the old rows: the new ones hold whatever resize_token_embeddings drew.
        old_rows = base.weight[: len(tokenizer) - len(handles)]
        vectors = _init_vectors(tokenizer, old_rows, init_words, len(handles), generator)
        base.weight[ids] = vectors.to(base.weight.dtype)
    wrapper = HandleEmbedding(base, ids, vectors)
    text_encoder.set_input_embeddings(wrapper)
    return wrapper


def load_handles(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, handles: list[str],
                 vectors: torch.Tensor) -> list[int]:
    """Add trained handles to a plain text encoder by writing their rows (sampling, export)."""
    ids = add_handle_tokens(tokenizer, text_encoder, handles)
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[ids] = vectors.to(device=table.device, dtype=table.dtype)
    return ids


def remove_handle_wrapper(text_encoder: CLIPTextModel, wrapper: HandleEmbedding) -> None:
    """Write the trained vectors into the table and put the plain embedding back."""
    with torch.no_grad():
        wrapper.base.weight[wrapper.handle_ids] = wrapper.vectors.to(wrapper.base.weight.dtype)
    text_encoder.set_input_embeddings(wrapper.base)


def handle_positions(input_ids: torch.Tensor, handle_ids: torch.Tensor) -> torch.Tensor:
    """Token position of each handle in each prompt.

    Args:
        input_ids: (B, L) tokenized prompts.
        handle_ids: (B, K) handle token ids of each sample, in the order wanted.

    Returns:
        (B, K) long; a handle absent from a prompt raises (an invariant of our own prompts).
    """
    match = input_ids[:, None, :] == handle_ids.to(input_ids.device)[:, :, None]  # (B, K, L)
    assert bool(match.any(-1).all()), "a handle is missing from its prompt"
    return match.float().argmax(-1)
