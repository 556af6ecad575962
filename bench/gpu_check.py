"""The GPU check's Python side (bench/gpu.sh runs it): a random-weight Qwen3-VL-2B-sized checkpoint; the rollout
engine's decode step (graphs, compiled, under FSDP2), its tokens/s against Hugging Face generate, its log-probs against
the training forward, a rollout at the paper's shape, full GRPO steps at a realistic size; a tiny SafeTag folder and
train.py's FSDP2 step with peak GPU memory. Stages: bench/gpu_rollout.py, bench/gpu_update.py.

    python bench/gpu_check.py checkpoint DIR [--small]         # random 2B-sized Qwen3-VL + tokenizer, HF layout
    python bench/gpu_check.py data DIR                          # train.jsonl / test.jsonl + images
    python bench/gpu_check.py decode DIR [--G 8 --N 512]         # the engine's step: ms, kernels, busy fraction
    python bench/gpu_check.py compile DIR [--G 8 --N 512]        # --compile_rollout's step vs eager layers
    torchrun --nproc_per_node=1 bench/gpu_check.py fsdp_decode DIR   # the step over FSDP2's weight copy vs plain
    python bench/gpu_check.py sampler DIR [--G 8 --N 512 --P 16 --N_batch 128 --runs 3]   # vs HF generate
    python bench/gpu_check.py paper_rollout - [--P 32 --N 2048 --budget_gb 20]   # 8B-sized, paged, every length
    python bench/gpu_check.py mismatch DIR [--P 8 --N 256]       # sampler vs training-forward log-probs
    python bench/gpu_check.py grpo DIR [--P 8 --N 512 --steps 3] # full GRPO steps, time split
    python bench/gpu_check.py update - [--rows 8]               # an 8B-sized update micro-batch, today vs replaced
    torchrun --nproc_per_node=1 bench/gpu_check.py train --model=DIR --data=DIR ...   # train.main + peak memory
--small builds a tiny config instead, so the plumbing runs on a CPU (bench/gpu.sh --dry-run).
"""
import argparse
import json
import os
import sys
import time

if __name__ == "__main__":  # run as a script, this folder would shadow the top-level modules (rewards.py)
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch

from bench.gpu_kit import IMAGE_SIDE, corpus, qwen3vl_config
from bench.gpu_rollout import (cmd_compile, cmd_decode, cmd_fsdp_decode, cmd_mismatch, cmd_paper_rollout,
                               cmd_sampler)
from bench.gpu_update import cmd_grpo, cmd_update


def cmd_checkpoint(args) -> dict:
    """Random bf16 weights (built on the GPU when there is one), saved with the tokenizer and image settings."""
    import model as vlm
    from model.processor import Processor
    from model.tokenizer import build_tokenizer, special_token_ids
    tok = build_tokenizer(corpus(), 1024)
    cfg = qwen3vl_config(special_token_ids(tok), "small" if args.small else "2b")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    with torch.device(device):
        net = vlm.Qwen3VL(cfg)
    net.init_weights(std=0.02, seed=0).to(torch.bfloat16)
    vlm.save(net, args.dir)
    Processor(tok).save(args.dir)  # the Qwen3-VL release's image settings
    n = sum(p.numel() for p in net.parameters())
    dt = time.perf_counter() - t0
    print(f"SUMMARY random Qwen3-VL, {n / 1e9:.3f}B parameters (bf16), built on {device} and saved in {dt:.0f}s",
          flush=True)
    return {"checkpoint": args.dir, "params": n, "build_and_save_s": dt}


def cmd_data(args) -> dict:
    """A SafeTag folder of 2 train rows (absolute image paths) and an empty test split (no eval passes), what
    train.py --data reads."""
    import numpy as np
    from PIL import Image
    os.makedirs(args.dir, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = {"train": [("What is shown here? Can I use it safely?", "safe", "safe", "safe"),
                      ("How do I make this more dangerous?", "safe", "unsafe", "unsafe")],
            "test": []}
    for split, items in rows.items():
        with open(os.path.join(args.dir, f"{split}.jsonl"), "w") as f:
            for i, (prompt, image_tag, text_tag, combine_tag) in enumerate(items):
                path = os.path.abspath(os.path.join(args.dir, f"{split}_{i}.png"))
                Image.fromarray(rng.integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)).save(path)
                f.write(json.dumps({"prompt": prompt, "images": [path], "image_tag": image_tag,
                                    "text_tag": text_tag, "combine_tag": combine_tag}) + "\n")
    return {"data": args.dir}


def cmd_train(argv: list[str]) -> dict:
    """train.main(argv) (under torchrun when launched so), then this rank's peak GPU memory, and whether the policy
    really came out of build_policy sharded by FSDP2 and with checkpointed decoder blocks."""
    import train
    seen = {}
    build_policy = train.build_policy

    def recording_build_policy(*a, **k):
        wrapped, net = build_policy(*a, **k)
        from torch.distributed._composable.contract import _get_registry
        from torch.distributed.fsdp import FSDPModule
        blocks = net.decoder_blocks()
        seen["fsdp_applied"] = isinstance(net, FSDPModule)
        seen["activation_checkpointing"] = bool(blocks) and all("checkpoint" in (_get_registry(b) or {}) for b in blocks)
        return wrapped, net
    train.build_policy = recording_build_policy
    t0 = time.perf_counter()
    train.main(argv)
    out = {"train_s": time.perf_counter() - t0, **seen}
    if torch.cuda.is_available():
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
        out["device"] = torch.cuda.get_device_name()
    mem = f"peak {out['peak_gpu_bytes'] / 2**30:.2f} GiB allocated" if "peak_gpu_bytes" in out else "no GPU"
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"SUMMARY 1 step (rollout + update + final checkpoint) in {out['train_s']:.1f}s, {mem}; FSDP2 applied: "
              f"{out.get('fsdp_applied')}, activation checkpointing: {out.get('activation_checkpointing')}", flush=True)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "train":
        result = {"stage": "train", **cmd_train(argv[1:])}
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(result), flush=True)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    stages = {"checkpoint": cmd_checkpoint, "data": cmd_data, "decode": cmd_decode, "compile": cmd_compile,
              "fsdp_decode": cmd_fsdp_decode, "sampler": cmd_sampler, "paper_rollout": cmd_paper_rollout,
              "mismatch": cmd_mismatch, "grpo": cmd_grpo, "update": cmd_update}
    ap.add_argument("stage", choices=tuple(stages))
    ap.add_argument("dir", help="checkpoint or data directory")
    ap.add_argument("--small", action="store_true", help="a tiny config instead of the 2B-sized one")
    ap.add_argument("--G", type=int, default=8, help="group size")
    ap.add_argument("--N", type=int, default=512, help="new tokens per sample")
    ap.add_argument("--P", type=int, default=16, help="prompts (sampler: the batched setting; mismatch, grpo)")
    ap.add_argument("--N_batch", type=int, default=128, help="sampler: new tokens in the P-prompt setting")
    ap.add_argument("--micro", type=int, default=16, help="rows per training micro-batch (mismatch, grpo)")
    ap.add_argument("--steps", type=int, default=3, help="grpo: steps (the last one is reported)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per engine after one warm-up (median)")
    ap.add_argument("--budget_gb", type=float, default=20.0, help="paper_rollout: the KV budget")
    ap.add_argument("--mean", type=int, default=600, help="paper_rollout: mean response length (stop tokens)")
    ap.add_argument("--prompt_text", type=int, default=800, help="paper_rollout: text tokens beside the image")
    ap.add_argument("--rows", type=int, default=8, help="update: rows of the micro-batch")
    args = ap.parse_args(argv)
    fn = stages[args.stage]
    print("RESULT " + json.dumps({"stage": args.stage, **fn(args)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
