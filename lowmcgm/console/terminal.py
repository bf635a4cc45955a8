"""Text bound for a terminal: strings from outside (artifact metadata, file names, prompts) are
shown with their control characters escaped, never obeyed.

An artifact's ``base_model`` of ``ESC]0;...BEL ESC[2J`` would otherwise retitle the window and
clear the screen when ``inspect`` prints it or an error line quotes it; bidirectional overrides
would reorder what the line appears to say. Line breaks and tabs stay (multi-line reports keep
their shape; error lines are joined into one before they are escaped).
"""

from __future__ import annotations

import re

# C0 controls but tab and line feed, DEL, C1 controls (8-bit CSI and OSC), and Unicode's
# bidirectional embeddings, overrides and isolates.
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def escape_controls(text: str) -> str:
    """``text`` with each control character written as its Python escape (``\\x1b``, ``\\u202e``)."""
    return _CONTROLS.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
