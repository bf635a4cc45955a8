"""The text encoder's 77-token window: handles that fall past it are refused, cut words are said.

CLIP reads 77 tokens (the start token, 75 of the prompt, the end token); the tokenizer cuts the
rest silently. A handle cut off that way would be dropped from the prompt while its pose mask
still got a mask token, so it is refused; a prompt merely longer than the window gets a warning.
Positions are counted with each handle as one token, as it is once added to the tokenizer, so the
check works before training has added them.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from lowmcgm.errors import UserError

HANDLE_TEXT = re.compile(r"(<[A-Za-z0-9_\-]{1,32}>)")  # the names handles.HANDLE_PATTERN allows


def token_positions(text: str, tokenizer: Any) -> tuple[dict[str, int], int]:
    """Each handle's first token position (0 is the start token) and the prompt's length in tokens."""
    position, positions = 1, {}
    for piece in HANDLE_TEXT.split(text):
        if HANDLE_TEXT.fullmatch(piece):
            positions.setdefault(piece, position)
            position += 1
        elif piece.strip():
            position += len(tokenizer(piece, add_special_tokens=False).input_ids)
    return positions, position - 1


def check_handles_fit(prompts: list[tuple[str, str, list[str]]], tokenizer: Any,
                      warn: Callable[[str], None] | None = None) -> None:
    """Refuse prompts whose handles fall past the token window; warn about prompts that are cut.

    Args:
        prompts: ``(where, text, handles)`` per prompt, ``where`` for messages (``--prompt 2``).
        tokenizer: the base model's CLIP tokenizer.
        warn: receives one line per cut prompt.
    """
    window = tokenizer.model_max_length - 2  # the start and end tokens take two places
    for where, text, handles in prompts:
        positions, length = token_positions(text, tokenizer)
        late = [(h, positions[h]) for h in handles if positions.get(h, 0) > window]
        if late:
            handle, at = late[0]
            raise UserError(f"{where}: {handle} is token {at} of the prompt, past the text encoder's {window}-token "
                            "window, so it would be cut off (its pose with it): move it earlier or shorten the prompt.")
        if length > window and warn is not None:
            warn(f"{where} is {length} tokens long; the text encoder reads the first {window}, the rest is ignored.")
