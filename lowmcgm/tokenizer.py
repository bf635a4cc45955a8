"""A small CLIP byte-level BPE tokenizer built from a word list, for the tiny and toy models.

Real checkpoints bring their own tokenizer; this one exists because no tokenizer can be downloaded
here. It follows CLIP's layout (byte symbols, the same with ``</w>``, merges, two specials), so the
real ``CLIPTokenizer`` class loads, saves and reloads it.
"""

from __future__ import annotations

from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    # CLIP/GPT-2's printable stand-ins for raw bytes; transformers 5 no longer exports the helper.
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    visible += list(range(ord("®"), ord("ÿ") + 1))
    chars = visible[:]
    n = 0
    for b in range(256):
        if b not in visible:
            visible.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(visible, (chr(c) for c in chars)))


def build_clip_tokenizer(words: list[str], model_max_length: int = 77) -> CLIPTokenizer:
    """Build a CLIP tokenizer in which every word of ``words`` is one token.

    Args:
        words: lower-case words to encode as single tokens; any other text still tokenizes,
            byte by byte.
        model_max_length: the padded prompt length (77, as every SD text encoder).

    Returns:
        A ``CLIPTokenizer`` with ``256 * 2 + merges + 2`` entries.
    """
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    merges: list[tuple[str, str]] = []
    byte_map = _bytes_to_unicode()
    for word in sorted(set(w.lower() for w in words)):
        chars = [byte_map[b] for b in word.encode("utf-8")]
        if len(chars) < 2:
            continue
        chars[-1] += "</w>"
        # Merge left to right: each prefix becomes one symbol, so the word ends as one token.
        prefix = chars[0]
        for nxt in chars[1:]:
            merged = prefix + nxt
            if merged not in vocab:
                merges.append((prefix, nxt))
                vocab[merged] = len(vocab)
            prefix = merged
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
