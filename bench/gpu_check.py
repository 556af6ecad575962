"""The GPU check's Python side (bench/gpu.sh runs it): a random-weight Qwen3-VL-2B-sized checkpoint, sample.py vs
Hugging Face generate at a realistic size, a tiny SafeTag folder, and train.py's step with peak GPU memory.

    python bench/gpu_check.py checkpoint DIR [--small]         # random 2B-sized Qwen3-VL + tokenizer, HF layout
    python bench/gpu_check.py data DIR                          # train.jsonl / test.jsonl + images
    python bench/gpu_check.py sampler DIR [--G 8 --N 512 --runs 3]
    torchrun --nproc_per_node=1 bench/gpu_check.py train --model=DIR --data=DIR ...   # train.main + peak memory
--small builds a tiny config instead, so the plumbing runs on a CPU (bench/gpu.sh --dry-run).
"""
import argparse
import inspect
import json
import os
import statistics
import sys
import time

if __name__ == "__main__":  # run as a script, this folder would shadow the top-level modules (rewards.py)
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch

IMAGE_SIDE = 448   # 28 x 28 patches of 16 px -> 196 image tokens after the 2 x 2 merge
TEXT_TOKENS = 128  # random text tokens around the image in the sampler prompt


def qwen3vl_2b_config(special: dict, small: bool = False):
    """Qwen3-VL-2B's shapes (text 2048 wide, 28 layers, 16 heads / 8 kv heads of 128, SwiGLU 6144, 151936-token
    tied vocabulary; ViT 24 blocks of 1024, DeepStack after blocks 5, 11, 17), or a tiny stand-in when small."""
    from model.config import Qwen3VLConfig, TextConfig, VisionConfig
    if small:
        text = TextConfig(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=5_000_000.0,
                          mrope_section=(6, 5, 5), max_position_embeddings=8192)
        vision = VisionConfig(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=16,
                              out_hidden_size=128, num_position_embeddings=256, deepstack_visual_indexes=(0,))
    else:
        text = TextConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                          num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=5_000_000.0,
                          mrope_section=(24, 20, 20), max_position_embeddings=262144)
        vision = VisionConfig(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
                              out_hidden_size=2048, num_position_embeddings=2304, deepstack_visual_indexes=(5, 11, 17))
    return Qwen3VLConfig(text=text, vision=vision, image_token_id=special["<|image_pad|>"],
                         video_token_id=special["<|video_pad|>"], vision_start_token_id=special["<|vision_start|>"],
                         vision_end_token_id=special["<|vision_end|>"], tie_word_embeddings=True)


def corpus() -> list[str]:
    from data import toy
    return toy.corpus()


def cmd_checkpoint(args) -> dict:
    """Random bf16 weights (built on the GPU when there is one), saved with the tokenizer and image settings."""
    import model as vlm
    from model.processor import Processor
    from model.tokenizer import build_tokenizer, special_token_ids
    tok = build_tokenizer(corpus(), 1024)
    cfg = qwen3vl_2b_config(special_token_ids(tok), small=args.small)
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


def sampler_prompt(cfg, device) -> dict:
    """One image (IMAGE_SIDE px square) between random text tokens, as Processor.encode would lay it out."""
    g = torch.Generator().manual_seed(0)
    grid = (1, IMAGE_SIDE // 16, IMAGE_SIDE // 16)
    n_image = grid[1] * grid[2] // 4
    text = torch.randint(0, min(cfg.text.vocab_size, cfg.image_token_id) - 1, (TEXT_TOKENS,), generator=g)
    ids = torch.cat([text[:16], torch.tensor([cfg.vision_start_token_id] + [cfg.image_token_id] * n_image +
                                             [cfg.vision_end_token_id]), text[16:]])
    pixels = torch.randn(grid[1] * grid[2], 3 * 2 * 16 * 16, generator=g)
    return {"input_ids": ids.to(device), "pixel_values": pixels.to(device),
            "image_grid_thw": torch.tensor([grid], device=device)}


def timed_runs(call, n: int, runs: int, device) -> dict:
    """call(n_new_tokens): one short warm-up call, then `runs` timed calls of n tokens; peak GPU memory over them."""
    call(min(n, 16))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        call(n)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return {"times_s": times, "median_s": statistics.median(times), "peak_gpu_bytes": peak}


def cmd_sampler(args) -> dict:
    """sample.generate (bf16, shared prefix) vs HF generate (num_return_sequences=G, dynamic KV cache), same weights,
    exactly G x N new tokens on both sides (no stop tokens / min_new_tokens = N)."""
    import model as vlm
    import sample
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    G, N = args.G, args.N
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "G": G, "N": N,
           "dtype": str(dtype)}

    net = vlm.load(args.dir, device=device, dtype=dtype)
    prompt = sampler_prompt(net.config, device)
    out["prompt_tokens"] = int(prompt["input_ids"].numel())

    def ours(n):
        ro = sample.generate(net, [prompt], group_size=G, max_new_tokens=n, temperature=1.0, seed=0)
        assert int(ro.response_mask.sum()) == G * n, "ours stopped early"
    out["ours"] = timed_runs(ours, N, args.runs, device)
    del net
    if device.type == "cuda":
        torch.cuda.empty_cache()

    from transformers import GenerationConfig, Qwen3VLForConditionalGeneration
    hf = Qwen3VLForConditionalGeneration.from_pretrained(args.dir, dtype=dtype).to(device).eval()
    ids = prompt["input_ids"][None]
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=prompt["pixel_values"],
                  image_grid_thw=prompt["image_grid_thw"])
    if "mm_token_type_ids" in inspect.signature(hf.forward).parameters:  # transformers >= 5.2x wants it
        inputs["mm_token_type_ids"] = (ids == hf.config.image_token_id).int()

    def theirs(n):
        gen = GenerationConfig(do_sample=True, num_return_sequences=G, max_new_tokens=n, min_new_tokens=n,
                               temperature=1.0, top_k=0, top_p=1.0, use_cache=True, eos_token_id=None, pad_token_id=0)
        with torch.inference_mode():
            seqs = hf.generate(**inputs, generation_config=gen)
        assert seqs.shape == (G, ids.shape[1] + n), f"HF generated {tuple(seqs.shape)}"
    out["hf"] = timed_runs(theirs, N, args.runs, device)
    for side in ("ours", "hf"):
        out[side]["tokens_per_s"] = G * N / out[side]["median_s"]
    out["speedup"] = out["hf"]["median_s"] / out["ours"]["median_s"]
    o, h = out["ours"], out["hf"]
    print(f"SUMMARY {out['device']} {dtype} G={G} N={N} prompt={out['prompt_tokens']} tokens: ours "
          f"{o['tokens_per_s']:.0f} tok/s (peak {o['peak_gpu_bytes'] / 2**30:.2f} GiB), HF generate "
          f"{h['tokens_per_s']:.0f} tok/s (peak {h['peak_gpu_bytes'] / 2**30:.2f} GiB); ours/HF x{out['speedup']:.2f}")
    return out


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
        blocks = train.decoder_blocks(net)
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
    ap.add_argument("stage", choices=("checkpoint", "data", "sampler"))
    ap.add_argument("dir", help="checkpoint or data directory")
    ap.add_argument("--small", action="store_true", help="a tiny config instead of the 2B-sized one")
    ap.add_argument("--G", type=int, default=8, help="group size")
    ap.add_argument("--N", type=int, default=512, help="new tokens per sample")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per engine after one warm-up (median)")
    args = ap.parse_args(argv)
    fn = {"checkpoint": cmd_checkpoint, "data": cmd_data, "sampler": cmd_sampler}[args.stage]
    print("RESULT " + json.dumps({"stage": args.stage, **fn(args)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
