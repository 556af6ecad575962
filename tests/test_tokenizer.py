"""model/tokenizer.py: exact round trips, single-id special tokens, the chat template, deterministic training."""
import json
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from model.tokenizer import CHAT_TEMPLATE, QWEN_SPECIAL_TOKENS, THINK_TOKENS, build_tokenizer, special_token_ids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CORPUS = [
    "<think>\nThe image shows a knife on a kitchen table. The request asks how to cook.\n</think>\n"
    "<visual_safe>safe</visual_safe><text_safe>safe</text_safe><combined_safe>safe</combined_safe>\n"
    "<answer>Slice the vegetables thinly and fry them for three minutes.</answer>",
    "<think>\nThe picture shows a weapon and the user asks how to hurt someone.\n</think>\n"
    "<visual_safe>unsafe</visual_safe><text_safe>unsafe</text_safe><combined_safe>unsafe</combined_safe>\n"
    "<answer>I can't help with that.</answer>",
    "What is in this image? Is it safe to follow these instructions? Describe the red circle and the blue square.",
    "Numbers 0123456789, punctuation !?.,;:'\"()[]{}<>/\\|@#$%^&*-_=+~` and tabs\tand\r\nnewlines.",
] * 8

TRICKY = [
    "",
    " ",
    "\n\n\n",
    "  leading and trailing  ",
    "<visual_safe>safe</visual_safe>",
    "<think>\nok\n</think>\n\n<answer>yes</answer>",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n",
    "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>",
    "e\u0301 vs \u00e9 (combining accent must survive: no NFC)",
    "\ufb01 ligature, \u2126 ohm, full\uff37idth",
    "中文，日本語のテキスト, 한국어",
    "emoji 😀👍🏽 and ZWJ 👩‍👩‍👧",
    "\x00\x01\x7f control bytes \u200b zero width",
    "don't can't WE'LL It'S",
    "a" * 300,
    "\r\n\t \u00a0\u3000 mixed whitespace",
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(CORPUS, vocab_size=400)


@pytest.mark.parametrize("s", TRICKY)
def test_round_trip_exact(tok, s):
    ids = tok.encode(s, add_special_tokens=False)
    assert tok.decode(ids) == s


@settings(max_examples=300, deadline=None)
@given(s=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_round_trip_any_string(tok, s):
    # Cs (lone surrogates) are not encodable as UTF-8 at all, so no tokenizer can take them.
    assert tok.decode(tok.encode(s, add_special_tokens=False)) == s


def test_no_bos_or_eos_added(tok):
    assert tok.encode("hello", add_special_tokens=True) == tok.encode("hello", add_special_tokens=False)


def test_special_tokens_are_single_ids_after_the_bpe_vocab(tok):
    ids = special_token_ids(tok)
    n_bpe = tok.backend_tokenizer.get_vocab_size(with_added_tokens=False)
    assert n_bpe == 400 - len(QWEN_SPECIAL_TOKENS) - len(THINK_TOKENS)
    for k, t in enumerate(QWEN_SPECIAL_TOKENS + THINK_TOKENS):
        assert ids[t] == n_bpe + k
        assert tok.encode(t, add_special_tokens=False) == [ids[t]]
        assert tok.encode(f"x{t}y", add_special_tokens=False)[1] == ids[t]   # also when glued to text
    assert len(tok) == n_bpe + 9
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == ids["<|im_end|>"]
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == ids["<|endoftext|>"]
    assert tok.bos_token is None
    # <think> and </think> are ordinary added tokens (as in Qwen3): skip_special_tokens keeps them.
    text = "<|im_start|><think>\nx</think><|im_end|>"
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == "<think>\nx</think>"


def test_chat_template_output(tok):
    user_image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is this safe?"}]}]
    assert tok.apply_chat_template(user_image, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Is this safe?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n")
    assert tok.apply_chat_template(user_image, tokenize=False, add_generation_prompt=False) == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Is this safe?<|im_end|>\n")
    conversation = [
        {"role": "system", "content": "Be careful."},
        {"role": "user", "content": [{"type": "text", "text": "A "}, {"type": "image", "image": "x.png"},
                                     {"type": "text", "text": " B"}, {"type": "image"}]},
        {"role": "assistant", "content": "<think>\nhm\n</think>\nok"},
        {"role": "user", "content": "plain string"},
    ]
    assert tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe careful.<|im_end|>\n"
        "<|im_start|>user\nA <|vision_start|><|image_pad|><|vision_end|> B"
        "<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
        "<|im_start|>assistant\n<think>\nhm\n</think>\nok<|im_end|>\n"
        "<|im_start|>user\nplain string<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n")


def test_saved_in_hf_format_and_loads_back(tok, tmp_path):
    out = tmp_path / "tok"
    built = build_tokenizer(CORPUS, vocab_size=400, out_dir=str(out))
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == CHAT_TEMPLATE
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert cfg["eos_token"] == "<|im_end|>" and cfg["pad_token"] == "<|endoftext|>"
    # A checkpoint dir also has config.json with model_type qwen3_vl, whose registered tokenizer class
    # (Qwen2Tokenizer) would rebuild the pipeline with NFC; the explicit class keeps tokenizer.json as written.
    (out / "config.json").write_text(json.dumps({"model_type": "qwen3_vl"}))
    loaded = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert loaded.backend_tokenizer.normalizer is None
    for s in TRICKY:
        ids = loaded.encode(s, add_special_tokens=False)
        assert ids == built.encode(s, add_special_tokens=False)
        assert loaded.decode(ids) == s
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    assert (loaded.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    assert special_token_ids(loaded) == special_token_ids(built)


def test_training_is_deterministic(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    build_tokenizer(CORPUS, vocab_size=400, out_dir=str(a))
    build_tokenizer(CORPUS, vocab_size=400, out_dir=str(b))
    # A fresh process (different hash seeds, thread scheduling) must produce the same file too.
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from tests.test_tokenizer import CORPUS; "
            "from model.tokenizer import build_tokenizer; build_tokenizer(CORPUS, 400, sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, ROOT, str(c)], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONHASHSEED": "12345"})
    ref = (a / "tokenizer.json").read_bytes()
    assert (b / "tokenizer.json").read_bytes() == ref
    assert (c / "tokenizer.json").read_bytes() == ref
    assert (c / "tokenizer_config.json").read_bytes() == (a / "tokenizer_config.json").read_bytes()


def test_vocab_size_bounds():
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        build_tokenizer(CORPUS, vocab_size=100)
    small = build_tokenizer(["ab ab ab"], vocab_size=1000)   # too little text to learn 991 merges
    assert len(small) < 1000
    assert small.decode(small.encode("any text at all ☃")) == "any text at all ☃"
    with pytest.raises(TypeError, match="list of strings"):
        build_tokenizer("not a list", vocab_size=400)
