"""Train a small Qwen-style byte-level BPE tokenizer in code (tests and the toy world; no downloads).

    tok = build_tokenizer(corpus, vocab_size=512, out_dir="toy_ckpt")  # HF format, loads with AutoTokenizer
"""
import json
import os

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Qwen's control tokens, in this order, with ids right after the BPE vocabulary (as in the Qwen checkpoints,
# where <|endoftext|> = 151643 follows the 151643 BPE tokens): id = n_bpe + position in this tuple.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Qwen3 also has <think> / </think> as added but non-special tokens (kept by decode(skip_special_tokens=True)).
# They follow the special tokens: id = n_bpe + 7 and n_bpe + 8.
THINK_TOKENS = ("<think>", "</think>")

# Qwen2's pre-tokenizer regex (transformers' Qwen2Tokenizer): contractions, letter runs, single digits,
# punctuation runs, newlines, spaces. Bytes are then mapped to printable characters (GPT-2 ByteLevel).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# ChatML as in the Qwen3-VL-Thinking checkpoints, reduced to what this project renders: system/user/assistant
# turns whose content is a string or a list of {"type": "image"} / {"type": "video"} / {"type": "text", "text": ...}
# items; an image item becomes <|vision_start|><|image_pad|><|vision_end|> (the processor later repeats
# <|image_pad|> once per merged patch). The generation prompt opens the thinking block, as the Thinking models'
# template does. Not carried over: tool calls, and stripping <think> spans from earlier assistant turns.
CHAT_TEMPLATE = r"""{%- for message in messages -%}
    {{- '<|im_start|>' + message.role + '\n' -}}
    {%- if message.content is string -%}
        {{- message.content -}}
    {%- else -%}
        {%- for item in message.content -%}
            {%- if item.type == 'image' or 'image' in item or 'image_url' in item -%}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
            {%- elif item.type == 'video' or 'video' in item -%}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
            {%- elif 'text' in item -%}
                {{- item.text -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{- '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n<think>\n' -}}
{%- endif -%}"""

N_ADDED = len(QWEN_SPECIAL_TOKENS) + len(THINK_TOKENS)
N_BYTES = 256  # the byte-level alphabet is always in the vocabulary, so any string can be encoded


def build_tokenizer(corpus: list[str], vocab_size: int, out_dir: str | None = None) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on `corpus` (deterministic) and wrap it as a Hugging Face tokenizer.

    `vocab_size` is the total size including the 9 added tokens; a corpus too small to learn that many merges
    gives a smaller vocabulary (len(tokenizer) <= vocab_size). decode(encode(s)) == s for every string: there is
    no normalizer (Qwen's NFC one would compose accents) and the byte alphabet covers all input.
    """
    if vocab_size < N_BYTES + N_ADDED:
        raise ValueError(f"vocab_size={vocab_size} is too small: need at least {N_BYTES + N_ADDED} "
                         f"({N_BYTES} byte tokens + {N_ADDED} added tokens)")
    if isinstance(corpus, str) or not all(isinstance(s, str) for s in corpus):
        raise TypeError("corpus must be a list of strings")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - N_ADDED,
        min_frequency=2,  # never merge a pair seen once: keeps the learned vocab from memorising single strings
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    if out_dir is not None:
        save_tokenizer(hf_tok, out_dir)
    return hf_tok


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str) -> None:
    """Write tokenizer.json + tokenizer_config.json (chat template inline, as Qwen's checkpoints ship it)."""
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    # transformers 5 writes its generic class as "TokenizersBackend", a name transformers 4 (and tools pinned to
    # it, e.g. vLLM) cannot resolve; "PreTrainedTokenizerFast" means the same class in both.
    config_file = os.path.join(out_dir, "tokenizer_config.json")
    with open(config_file) as f:
        config = json.load(f)
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        with open(config_file, "w") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)


def special_token_ids(tokenizer) -> dict[str, int]:
    """{token: id} for the Qwen special tokens and <think>/</think>; a KeyError names any that is missing."""
    vocab = tokenizer.get_vocab()
    ids = {}
    for t in QWEN_SPECIAL_TOKENS + THINK_TOKENS:
        if t not in vocab:
            raise KeyError(f"tokenizer has no {t!r} token")
        ids[t] = vocab[t]
    return ids


def vision_token_ids(tokenizer) -> dict[str, int]:
    """The config fields that name the tokenizer's vision tokens (image_token_id, video_token_id,
    vision_start_token_id, vision_end_token_id), for a model config built in code around that tokenizer."""
    ids = special_token_ids(tokenizer)
    return {"image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
            "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"]}
