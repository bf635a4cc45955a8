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


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding as the tokenizers library runs it: merge the best-ranked pair first."""
    symbols = list(symbols)
    while len(symbols) > 1:
        rank, i = min((ranks.get(pair, len(ranks) + 1), i) for i, pair in enumerate(zip(symbols, symbols[1:])))
        if rank > len(ranks):
            break
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def build_clip_tokenizer(words: list[str], model_max_length: int = 77) -> CLIPTokenizer:
    """Build a CLIP tokenizer in which every word of ``words`` is one token.

    Args:
        words: lower-case words to encode as single tokens; any other text still tokenizes,
            byte by byte.
        model_max_length: the padded prompt length (77, as every SD text encoder).

    Returns:
        A ``CLIPTokenizer`` with ``256 * 2 + merges + 2`` entries.
    """
    byte_map = _bytes_to_unicode()
    symbols = list(byte_map.values())
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in sorted(set(w.lower() for w in words)):
        chars = [byte_map[b] for b in word.encode("utf-8")]
        chars[-1] += "</w>"
        # Earlier words' merges apply first (a merge for "on" splits "person" into "pers" +
        # "on</w>"), so run them, then join what is left left to right. New merges rank last and
        # so never change how an earlier word splits.
        pieces = _apply_merges(chars, ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = [pair[0] + pair[1]] + pieces[2:]
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
