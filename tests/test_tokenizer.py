"""CLIP tokenizers: the small one (one token per listed word, survives save and reload), and
Stable Diffusion's, built offline, against open_clip's own tokenizer: its ids for the prompts below
are stored in tests/data/clip_token_ids.json (``python tests/test_tokenizer.py`` writes the file,
with open-clip-torch installed), and compared with open_clip itself when it is installed."""

import gzip
import hashlib
import importlib.util
import json
import random
import string
from pathlib import Path

import pytest
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lowmcgm.handles import add_handle_tokens
from lowmcgm.models.tiny import TINY_WORDS
from lowmcgm.models.tokenizer import (BOS_TOKEN, CLIP_VOCAB_SIZE, EOS_TOKEN, build_clip_tokenizer, build_sd_tokenizer,
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


GOLDEN_PATH = Path(__file__).parent / "data" / "clip_token_ids.json"
GOLDEN_COMMAND = "python tests/test_tokenizer.py  # with open-clip-torch installed: pip install --no-deps open-clip-torch==3.3.0"
HANDLES = ["<asset0>", "<asset1>"]


def _reference_tokenizer_module():
    """open_clip's ``tokenizer.py``, loaded by path: SD 2.x's own tokenizer code and vocabulary.

    The package is installed without its dependencies (``.ci/run``): importing ``open_clip`` would
    import torchvision, and no CPU torchvision matching CPU torch is installable here.
    """
    spec = importlib.util.find_spec("open_clip")  # finds, without importing, the package
    if spec is None:
        pytest.skip(f"open-clip-torch is not installed, so only its golden ids ({GOLDEN_PATH.name}) are compared: "
                    "pip install --no-deps open-clip-torch==3.3.0 to compare with open_clip itself")
    path = Path(spec.origin).parent / "tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference():
    return _reference_tokenizer_module()


@pytest.fixture(scope="module")
def golden():
    return json.loads(GOLDEN_PATH.read_text(encoding="utf-8"))


def _vocab_digest(vocab: dict[str, int]) -> str:
    return hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode("utf-8")).hexdigest()


def _reference_ids(ref_tokenizer, prompt: str) -> list[int]:
    """open_clip's ids up to and including <|endoftext|> (it pads with 0, which SD 1.x does not)."""
    ids = ref_tokenizer([prompt])[0].tolist()
    return ids[:ids.index(ref_tokenizer.eot_token_id) + 1]


def compute_reference_table(reference) -> dict:
    """What open_clip makes of the prompts above: the contents of ``tests/data/clip_token_ids.json``."""
    ref = reference.SimpleTokenizer()
    with_handles = reference.SimpleTokenizer(additional_special_tokens=HANDLES)
    vocab = {k.replace("<start_of_text>", BOS_TOKEN).replace("<end_of_text>", EOS_TOKEN): v
             for k, v in ref.encoder.items()}
    return {
        "vocab_size": ref.vocab_size,
        "vocab_sha256": _vocab_digest(vocab),
        "prompts": [{"text": p, "ids": _reference_ids(ref, p)} for p in PROMPTS],
        "prompts_cleaned_first": [{"text": p, "cleaned": reference.basic_clean(p), "ids": _reference_ids(ref, p)}
                                  for p in PROMPTS_CLEANED_FIRST],
        "handle_prompts": [{"text": p, "ids": _reference_ids(with_handles, p)} for p in HANDLE_PROMPTS],
    }


def _padded(ids: list[int], pad_id: int, length: int = 77) -> list[int]:
    # open_clip pads with 0 (SD 2.x); SD 1.x's ldm code pads with <|endoftext|> (CLIPTokenizer).
    return ids + [pad_id] * (length - len(ids))


def _ours(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt, padding="max_length", truncation=True, max_length=tokenizer.model_max_length).input_ids


def test_golden_ids_are_open_clips_own(reference, golden):
    """The golden file is what open_clip makes of today's prompts (else: regenerate it)."""
    table = compute_reference_table(reference)
    assert {k: golden[k] for k in table} == table, f"stale {GOLDEN_PATH.name}: {GOLDEN_COMMAND}"


@pytest.mark.parametrize("config_name,pad_id", [("sd15", 49407), ("sd21-base", 0), ("sd21-768", 0)])
def test_sd_tokenizer_matches_open_clips_ids(golden, config_name, pad_id):
    tok = build_sd_tokenizer(config_name)
    assert [c["text"] for c in golden["prompts"]] == PROMPTS, f"stale {GOLDEN_PATH.name}: {GOLDEN_COMMAND}"
    assert [c["text"] for c in golden["prompts_cleaned_first"]] == PROMPTS_CLEANED_FIRST
    assert len(tok) == CLIP_VOCAB_SIZE == golden["vocab_size"] and tok.model_max_length == 77
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, pad_id)
    assert _vocab_digest(tok.get_vocab()) == golden["vocab_sha256"]
    for case in golden["prompts"]:
        assert _ours(tok, case["text"]) == _padded(case["ids"], pad_id), case["text"]
    for case in golden["prompts_cleaned_first"]:
        assert _ours(tok, case["cleaned"]) == _padded(case["ids"], pad_id), case["text"]
    long_ids = _ours(tok, PROMPTS[-2])
    assert len(long_ids) == 77 and long_ids[-1] == 49407


@pytest.mark.parametrize("config_name,pad_id", [("sd15", 49407), ("sd21-768", 0)])
def test_handles_tokenize_like_open_clip(golden, config_name, pad_id):
    tok = build_sd_tokenizer(config_name)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, hidden_size=8, intermediate_size=16,
                                                num_hidden_layers=1, num_attention_heads=2))
    assert add_handle_tokens(tok, text_encoder, HANDLES) == [49408, 49409]
    assert text_encoder.get_input_embeddings().weight.shape[0] == 49410
    assert [c["text"] for c in golden["handle_prompts"]] == HANDLE_PROMPTS, f"stale {GOLDEN_PATH.name}: {GOLDEN_COMMAND}"
    for case in golden["handle_prompts"]:
        assert _ours(tok, case["text"]) == _padded(case["ids"], pad_id), case["text"]


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


def write_golden_file() -> None:
    """Writes tests/data/clip_token_ids.json from open_clip's tokenizer (run once, see GOLDEN_COMMAND)."""
    from importlib.metadata import version

    table = {"made_by": GOLDEN_COMMAND, "open_clip_version": version("open-clip-torch"),
             **compute_reference_table(_reference_tokenizer_module())}

    def dumps(value) -> str:
        return json.dumps(value, ensure_ascii=False)

    def field(key: str, value) -> str:
        if isinstance(value, list):  # one case a line: a readable diff when prompts change
            return f" {dumps(key)}: [\n" + ",\n".join("  " + dumps(case) for case in value) + "\n ]"
        return f" {dumps(key)}: {dumps(value)}"

    GOLDEN_PATH.parent.mkdir(exist_ok=True)
    GOLDEN_PATH.write_text("{\n" + ",\n".join(field(k, v) for k, v in table.items()) + "\n}\n", encoding="utf-8")


if __name__ == "__main__":
    write_golden_file()
