"""CLIP tokenizers: the small one (one token per listed word, survives save and reload), and
Stable Diffusion's, built offline, against open_clip's own tokenizer."""

import gzip
import importlib.util
import random
import string
from pathlib import Path

import pytest
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lowmcgm.handles import add_handle_tokens
from lowmcgm.models import TINY_WORDS
from lowmcgm.tokenizer import (BOS_TOKEN, CLIP_VOCAB_SIZE, EOS_TOKEN, build_clip_tokenizer, build_sd_tokenizer,
                               load_clip_bpe)


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


# --- Stable Diffusion's tokenizers, built from the shipped vocabulary ---------------------------

PROMPTS = [
    "a photo of a dog",
    "A PHOTO, of a dog!!! (on the beach); 50% off... #tag @user ! !! ?!",
    "it's the dog's toy, isn't it? they'll've",
    "café naïve Ærø straße",
    "東京の猫 🐶🐱 emoji",
    "tabs\tand\nnewlines   and  spaces ",
    "numbers 1234567 3.14 and 1,000",
    "e\u0301 combining accent",
    " ".join(f"word{i} and more" for i in range(60)),  # far past 77 tokens: truncated
    "",
]
# CLIP's own cleaning (ftfy.fix_text, html.unescape) is not part of transformers' CLIPTokenizer,
# which normalizes with NFC and lower case only, as the hub tokenizers do in diffusers; text that
# the cleaning changes is compared after it.
PROMPTS_CLEANED_FIRST = ["“curly quotes” and ‘single’", "fish &amp; chips &lt;b&gt;", "ﬁne ligature", "cafÃ©"]
# The handles as lowmcgm adds them (added tokens, ids 49408 on). The reference knows them as extra
# special tokens, which its word regex finds only at a word's start: handles follow a space here.
HANDLE_PROMPTS = ["a photo of <asset0> and <asset1> on the beach", "<asset0>, <asset1>!",
                  "<asset0><asset1>", "A <ASSET0> dog", "x<asset0>y", "<asset1>s", "a " * 80 + "<asset0>"]


def _reference_tokenizer_module():
    """open_clip's ``tokenizer.py``, loaded by path: SD 2.x's own tokenizer code and vocabulary.

    The package is installed without its dependencies (``.ci/run``): importing ``open_clip`` would
    import torchvision, and no CPU torchvision matching CPU torch is installable here.
    """
    spec = importlib.util.find_spec("open_clip")  # finds, without importing, the package
    assert spec is not None, "open-clip-torch is missing: pip install --no-deps open-clip-torch"
    path = Path(spec.origin).parent / "tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference():
    return _reference_tokenizer_module()


def _reference_ids(ref_tokenizer, prompt: str, pad_id: int) -> list[int]:
    # open_clip pads with 0 (SD 2.x); SD 1.x's ldm code pads with <|endoftext|> (CLIPTokenizer).
    ids = ref_tokenizer([prompt])[0].tolist()
    end = ids.index(ref_tokenizer.eot_token_id) + 1
    return ids[:end] + [pad_id] * (len(ids) - end)


def _ours(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt, padding="max_length", truncation=True, max_length=tokenizer.model_max_length).input_ids


@pytest.mark.parametrize("config_name,pad_id", [("sd15", 49407), ("sd21-base", 0), ("sd21-768", 0)])
def test_sd_tokenizer_matches_the_reference(reference, config_name, pad_id):
    tok = build_sd_tokenizer(config_name)
    ref = reference.SimpleTokenizer()
    assert len(tok) == CLIP_VOCAB_SIZE == ref.vocab_size and tok.model_max_length == 77
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, pad_id)
    assert tok.get_vocab() == {k.replace("<start_of_text>", BOS_TOKEN).replace("<end_of_text>", EOS_TOKEN): v
                               for k, v in ref.encoder.items()}
    for prompt in PROMPTS:
        assert _ours(tok, prompt) == _reference_ids(ref, prompt, pad_id), prompt
    for prompt in PROMPTS_CLEANED_FIRST:
        assert _ours(tok, reference.basic_clean(prompt)) == _reference_ids(ref, prompt, pad_id), prompt
    long_ids = _ours(tok, PROMPTS[-2])
    assert len(long_ids) == 77 and long_ids[-1] == 49407


@pytest.mark.parametrize("config_name,pad_id", [("sd15", 49407), ("sd21-768", 0)])
def test_handles_tokenize_like_the_reference(reference, config_name, pad_id):
    tok = build_sd_tokenizer(config_name)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, hidden_size=8, intermediate_size=16,
                                                num_hidden_layers=1, num_attention_heads=2))
    handles = ["<asset0>", "<asset1>"]
    assert add_handle_tokens(tok, text_encoder, handles) == [49408, 49409]
    assert text_encoder.get_input_embeddings().weight.shape[0] == 49410
    ref = reference.SimpleTokenizer(additional_special_tokens=handles)
    for prompt in HANDLE_PROMPTS:
        assert _ours(tok, prompt) == _reference_ids(ref, prompt, pad_id), prompt


def test_sd2_pad_is_not_split_out_of_prompts():
    """"!" is SD 2.x's pad token and an ordinary character of its prompts (diffusers issue 4153)."""
    tok = build_sd_tokenizer("sd21-768")
    ids = tok("wow!!! !", add_special_tokens=False).input_ids
    assert ids == tok.convert_tokens_to_ids(["wow</w>", "!!!</w>", "!</w>"]) and tok.pad_token_id not in ids


def test_a_file_that_is_not_the_clip_vocabulary_fails(tmp_path):
    path = tmp_path / "bpe.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\na b\n")
    with pytest.raises(AssertionError, match="not CLIP's BPE vocabulary"):
        load_clip_bpe(path)
