"""One micro-batch of the update (forward + backward of the shared-prefix training forward and its log-probs), today's
path against the one it replaced, side by side in one run: peak memory (the CPU allocator's, as the profiler records
every allocation and free) and time. The shape is the paper's where it matters (32 query / 8 key-value heads, the real
151,936-token vocabulary, a 1,000-token prompt with an image, 8 rows of responses of different lengths), in a narrow
model that a CPU runs (2 decoder layers of width 2048).

    python bench/update_memory.py                      # responses 300-2048 tokens, bf16 autocast
    python bench/update_memory.py --max_response 1024 --dtype fp32
    python bench/update_memory.py --activation_checkpointing   # both paths recompute each decoder block in backward

replaced: the masked forward (tests/oracle.py masked_grouped_logits: dense masks, keys repeated to every query head,
          the whole (rows, R, V) logits kept for the backward) and the chunked log-probs of those logits
today:    model/prefix.grouped_hidden (no mask, grouped keys, left padding cut off) and logprobs.head_logprobs
          (log-probs chunk by chunk through the LM head, recomputed in backward)
The last line is the peak-memory ratio, replaced / today.
"""
import argparse
import os
import sys
import time

if __name__ == "__main__":  # run as a script: make the repository root (and the tests' oracle) importable
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[0:0] = [root, os.path.join(root, "tests")]

import torch


def narrow_config(vocab: int, layers: int, width: int, head_dim: int):
    from model.config import Qwen3VLConfig, TextConfig, VisionConfig
    heads = width // head_dim
    text = TextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=3 * width, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads // 4, head_dim=head_dim,
                      rope_theta=5_000_000.0, mrope_section=(head_dim // 8 * 1.5, head_dim // 8 * 1.25,
                                                             head_dim // 8 * 1.25), max_position_embeddings=16384)
    text.mrope_section = tuple(int(x) for x in text.mrope_section)
    vision = VisionConfig(depth=2, hidden_size=256, intermediate_size=512, num_heads=4, patch_size=16,
                          out_hidden_size=width, num_position_embeddings=1024, deepstack_visual_indexes=(0,))
    return Qwen3VLConfig(text=text, vision=vision, image_token_id=vocab - 10, video_token_id=vocab - 9,
                         vision_start_token_id=vocab - 12, vision_end_token_id=vocab - 11, tie_word_embeddings=True)


def batch_of(cfg, prompt_len: int, rows: int, lengths: list[int]):
    g = torch.Generator().manual_seed(0)
    grid = (1, 16, 16)  # a 256 px image: 64 image tokens after the 2 x 2 merge
    n_image = grid[1] * grid[2] // 4
    text = torch.randint(0, cfg.text.vocab_size - 100, (prompt_len - n_image - 2,), generator=g)
    ids = torch.cat([text[:8], torch.tensor([cfg.vision_start_token_id] + [cfg.image_token_id] * n_image +
                                            [cfg.vision_end_token_id]), text[8:]])[None]
    pixels = torch.randn(grid[1] * grid[2], 3 * 2 * 16 * 16, generator=g)
    R = max(lengths)
    mask = (torch.arange(R)[None] < torch.tensor(lengths)[:, None]).float()
    responses = torch.randint(0, cfg.text.vocab_size - 100, (rows, R), generator=g) * mask.long()
    return dict(prompt_ids=ids, prompt_mask=torch.ones_like(ids), pixel_values=pixels,
                image_grid_thw=torch.tensor([grid]), response_ids=responses, response_mask=mask,
                row_prompt=torch.zeros(rows, dtype=torch.long))


def replaced(net, batch, autocast):
    from logprobs import token_logprobs
    from oracle import masked_grouped_logits
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits, anchor = masked_grouped_logits(net, **batch)
        logp = token_logprobs(logits, batch["response_ids"])
    return logp, anchor


def today(net, batch, autocast):
    from logprobs import head_logprobs
    from model.prefix import grouped_hidden
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        hidden, anchor = grouped_hidden(net, **batch)
        logp, _ = head_logprobs(hidden, net.lm_head.weight, batch["response_ids"], mask=batch["response_mask"])
    return logp, anchor


def measure(fn, net, batch, autocast) -> dict:
    """One forward + backward under the profiler: the peak of the CPU allocator's live bytes (allocations and frees
    in the order they happened, from the start of the call) and the wall time of the same call unprofiled."""
    from torch.profiler import ProfilerActivity, profile

    def step():
        net.zero_grad(set_to_none=True)
        logp, anchor = fn(net, batch, autocast)
        ((logp * batch["response_mask"]).sum() + anchor).backward()
    t0 = time.perf_counter()
    step()
    wall = time.perf_counter() - t0
    net.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # every allocation and free, attributed to the innermost op that made it (self) or to no op ([memory]), in order
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return {"peak_bytes": peak, "wall_s": wall, "grads": grads}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--prompt_len", type=int, default=1000)
    ap.add_argument("--min_response", type=int, default=300)
    ap.add_argument("--max_response", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--head_dim", type=int, default=64, help="32 query heads at width 2048, 8 key-value heads")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="bf16: autocast over fp32 weights")
    ap.add_argument("--activation_checkpointing", action="store_true",
                    help="wrap every decoder block in activation checkpointing (train.py's flag; the paper's stack "
                         "trains with it): the blocks' saved activations, common to both paths, go")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import model as vlm
    cfg = narrow_config(args.vocab, args.layers, args.width, args.head_dim)
    net = vlm.Qwen3VL(cfg).init_weights(std=0.02, seed=0).train()
    if args.activation_checkpointing:
        from torch.distributed._composable import checkpoint
        for block in net.decoder_blocks():
            checkpoint(block)
    step = (args.max_response - args.min_response) / max(1, args.rows - 1)
    lengths = [round(args.min_response + i * step) for i in range(args.rows)]
    batch = batch_of(cfg, args.prompt_len, args.rows, lengths)
    autocast = args.dtype == "bf16"
    params = sum(p.numel() for p in net.parameters())
    print(f"{args.layers} layers of width {args.width} ({cfg.text.num_attention_heads} / "
          f"{cfg.text.num_key_value_heads} heads of {args.head_dim}), vocabulary {args.vocab}, {params / 1e6:.0f}M "
          f"parameters (fp32{', bf16 autocast' if autocast else ''}); a {args.prompt_len}-token prompt with an image, "
          f"{args.rows} rows of {args.min_response}-{args.max_response} response tokens; "
          f"{'activation checkpointing; ' if args.activation_checkpointing else ''}{args.threads} threads",
          flush=True)
    results = {"today": measure(today, net, batch, autocast), "replaced": measure(replaced, net, batch, autocast)}
    worst = max(float((results["today"]["grads"][n] - g).abs().max() / (1 + g.abs().max()))
                for n, g in results["replaced"]["grads"].items())
    print("| path | peak memory | time |")
    print("|---|---|---|")
    for name in ("replaced", "today"):
        r = results[name]
        print(f"| {name} | {r['peak_bytes'] / 2**30:.2f} GiB | {r['wall_s']:.1f} s |")
    print(f"gradients agree to {worst:.1e} (largest difference, relative to each tensor's largest gradient)")
    ratio = results["replaced"]["peak_bytes"] / results["today"]["peak_bytes"]
    print(f"peak memory, replaced / today: {ratio:.2f}x")
    return results


if __name__ == "__main__":
    main()
