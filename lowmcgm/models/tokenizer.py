"""CLIP byte-level BPE tokenizers: Stable Diffusion's own, and a small one for the tiny models.

``build_sd_tokenizer`` builds the SD 1.x (CLIP ViT-L/14) and SD 2.x (OpenCLIP ViT-H/14) tokenizer
from CLIP's BPE vocabulary, shipped in ``lowmcgm/models/vocab`` (see the LICENSE there), with the special
tokens, pad token and length of the family's hub ``tokenizer_config.json`` (shipped in
``lowmcgm/models/configs``): a single-file checkpoint needs no tokenizer folder and no hub cache.
``build_clip_tokenizer`` makes a small tokenizer from a word list for the tiny and toy models.
Both follow CLIP's layout (byte symbols, the same with ``</w>``, merges, two specials) and are the
real ``CLIPTokenizer`` class, which loads, saves and reloads them; the BPE itself is transformers'.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
CLIP_VOCAB_FILE = Path(__file__).resolve().parent / "vocab" / "bpe_simple_vocab_16e6.txt.gz"
# CLIP's SimpleTokenizer (clip/simple_tokenizer.py) reads lines 1 .. 49152 - 256 - 2 of the file
# (line 0 is a version header): 48,894 merges, which with 2 x 256 byte symbols and the two
# specials make the 49,408 entries of every SD 1.x/2.x text encoder's embedding table.
CLIP_NUM_MERGES = 49152 - 256 - 2
CLIP_VOCAB_SIZE = 49408


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


def load_clip_bpe(path: Path = CLIP_VOCAB_FILE) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Read CLIP's BPE file into the vocabulary and merges that ``CLIPTokenizer`` takes.

    The ids are CLIP's: 256 byte symbols, the same with ``</w>``, one entry per merge in rank
    order, then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).

    Args:
        path: a ``bpe_simple_vocab_16e6.txt.gz`` (the shipped copy by default).

    Returns:
        ``(vocab, merges)``: token -> id, and the merges as pairs, best rank first.
    """
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:CLIP_NUM_MERGES + 1]]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    assert len(vocab) == CLIP_VOCAB_SIZE, f"{path} is not CLIP's BPE vocabulary ({len(vocab)} entries)"
    return vocab, merges


def build_sd_tokenizer(config_name: str, subfolder: str = "tokenizer") -> CLIPTokenizer:
    """The tokenizer of a Stable Diffusion family, built offline from the shipped vocabulary.

    Args:
        config_name: a shipped model config (``sd15``, ``sd21-base``, ``sd21-768``, ``sdxl-base``);
            its ``tokenizer_config.json``, copied from the hub, sets the special tokens, the pad
            token (SD 1.x pads with ``<|endoftext|>``, SD 2.x with ``!``, id 0, as OpenCLIP's
            ``tokenize`` pads with zeros) and the length (77).
        subfolder: ``tokenizer``, or ``tokenizer_2`` for SDXL's second (OpenCLIP, pads with ``!``).

    Returns:
        A ``CLIPTokenizer`` with CLIP's 49,408 entries.
    """
    from lowmcgm.models.configs import config_folder

    config = json.loads((config_folder(config_name) / subfolder / "tokenizer_config.json").read_text())
    # The hub config writes special tokens either as strings or as AddedToken dicts.
    special = {key: config[key]["content"] if isinstance(config[key], dict) else config[key]
               for key in ("bos_token", "eos_token", "unk_token", "pad_token")}
    vocab, merges = load_clip_bpe()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=config["model_max_length"],
                              bos_token=special["bos_token"], eos_token=special["eos_token"],
                              unk_token=special["unk_token"], pad_token=special["eos_token"])
    # The pad is set by id, not passed as pad_token: a pad token given to the constructor becomes
    # an added token that the text is split on, so SD 2.x's "!" would turn every "!" of a prompt
    # into the pad id, where OpenCLIP's tokenizer (the one SD 2.x was trained with) merges "!!!"
    # into one token (diffusers issue 4153).
    tokenizer.pad_token_id = vocab[special["pad_token"]]
    return tokenizer
