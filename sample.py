"""Group sampling for GRPO: G samples per prompt from one image encoding and one prefill per prompt (the rollout
engine, engine.py). Library (`generate`) and CLI:

    python sample.py --model DIR --image cat.png --prompt "Is this safe?" --group_size 4 \
        [--labels image_tag=safe,text_tag=safe,combine_tag=safe]
"""
import argparse
import json
import os
import sys

import torch

import rewards
from rollout.engine import Engine, Rollout


def generate(model, prompts: list[dict], group_size: int, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, stop_token_ids=(), seed: int = 0, pad_token_id: int = 0,
             prompt_seeds: list[int] | None = None, kv_budget_bytes: int | None = None) -> Rollout:
    """G samples for each prompt (Processor.encode dicts of different lengths, with or without images), never holding
    more than kv_budget_bytes of KV cache (None: all prompts at once). One call, one Engine: a caller that generates
    again and again (the trainer, an evaluation loop) keeps an engine.Engine instead, whose buffers and CUDA graphs
    are reused. Each row's samples depend only on (prompt_seeds[i] or (seed, i), sample index)."""
    return Engine(model, kv_budget_bytes=kv_budget_bytes).generate(
        prompts, group_size, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        stop_token_ids=stop_token_ids, seed=seed, pad_token_id=pad_token_id, prompt_seeds=prompt_seeds)


# ----------------------------------------------------------------------------- CLI

LABEL_KEYS = tuple(rewards.LABEL_KEYS.values())  # image_tag, text_tag, combine_tag: the reward's own names


def parse_labels(spec: str) -> dict:
    """'image_tag=safe,text_tag=unsafe,combine_tag=unsafe' -> dict, all three keys, values safe/unsafe."""
    labels = {}
    for item in spec.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or key not in LABEL_KEYS or value.strip().lower() not in ("safe", "unsafe"):
            raise ValueError(f"--labels: bad item {item!r}; expected e.g. image_tag=safe,text_tag=unsafe,"
                             f"combine_tag=unsafe")
        labels[key] = value.strip().lower()
    missing = [k for k in LABEL_KEYS if k not in labels]
    if missing:
        raise ValueError(f"--labels: missing {', '.join(missing)} (need {', '.join(LABEL_KEYS)})")
    return labels


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Sample G responses from a checkpoint for one image + prompt.")
    ap.add_argument("--model", required=True, help="checkpoint directory (config.json, safetensors, tokenizer)")
    ap.add_argument("--image", action="append", default=[], help="image file; repeat for several, omit for text only")
    ap.add_argument("--prompt", required=True, help="the user's question")
    ap.add_argument("--group_size", type=int, default=4, help="G: samples to draw")
    ap.add_argument("--max_new_tokens", type=int, default=512, help="response length limit")
    ap.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    ap.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    ap.add_argument("--top_k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    ap.add_argument("--seed", type=int, default=0, help="samples depend only on (seed, sample index)")
    ap.add_argument("--labels", default=None,
                    help="reference tags, e.g. image_tag=safe,text_tag=unsafe,combine_tag=unsafe: print rewards")
    ap.add_argument("--no_step_guided", action="store_true", help="send the question without the step-guided prompt")
    ap.add_argument("--prompt_file", default=None, help="a file with your own step-guided instruction")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_cli(args)
    except (ValueError, TypeError, KeyError, OSError) as e:  # OSError covers FileNotFoundError
        print(f"error: {e}", file=sys.stderr)
        return 2


def run_cli(args) -> int:
    import model as model_lib
    from data.prompt import build_prompt

    # Everything cheap first, so that bad input fails before the model is read.
    labels = parse_labels(args.labels) if args.labels is not None else None
    for path in args.image:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--image: file not found: {path}")
    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"--model: checkpoint directory not found: {args.model}")
    processor = model_lib.load_processor(args.model)  # raises if the checkpoint has no tokenizer
    text = args.prompt if args.no_step_guided else build_prompt(args.prompt, args.prompt_file)
    encoded = processor.encode(text, args.image)
    net = model_lib.load(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    ro = generate(net, [encoded], group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                  stop_token_ids=processor.stop_token_ids, seed=args.seed, pad_token_id=processor.pad_token_id)
    for r in range(args.group_size):
        ids = ro.response_ids[r][ro.response_mask[r].bool()].tolist()
        text = processor.decode(ids, skip_special_tokens=True)  # as the trainer decodes it for the reward
        print(f"=== sample {r} ({len(ids)} tokens, {ro.finish_reason[r]}) ===")
        print(text)
        if labels is not None:
            reward, components = rewards.score(text, labels)
            print(f"--- reward {reward:.3f} " + json.dumps(components, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
