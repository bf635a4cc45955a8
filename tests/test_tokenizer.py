"""The project's small CLIP tokenizer: one token per listed word, survives save and reload."""

import random
import string

from transformers import CLIPTokenizer

from lowmcgm.models import TINY_WORDS
from lowmcgm.tokenizer import build_clip_tokenizer


def test_every_word_is_one_token_even_when_words_share_pieces(tmp_path):
    rng = random.Random(0)
    extra = ["".join(rng.choice(string.ascii_lowercase[:6]) for _ in range(rng.randint(2, 7))) for _ in range(200)]
    words = list(TINY_WORDS) + ["on", "person", "at", "cat", "an", "standing"] + extra
    tok = build_clip_tokenizer(words)
    tok.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    for t in (tok, again):
        for word in set(words):
            assert len(t(word, add_special_tokens=False).input_ids) == 1, (word, t.tokenize(word))


def test_other_text_still_tokenizes():
    tok = build_clip_tokenizer(["dog"])
    ids = tok("a zebra", add_special_tokens=False).input_ids
    assert len(ids) > 2 and tok.decode(ids).replace(" ", "") == "azebra"
