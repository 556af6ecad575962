"""The GPU check's Python side (bench/gpu.sh runs it): a random-weight Qwen3-VL-2B-sized checkpoint; the rollout
engine's decode step, its tokens/s against Hugging Face generate, its log-probs against the training forward, and
full GRPO steps at a realistic size; a tiny SafeTag folder and train.py's FSDP2 step with peak GPU memory.

    python bench/gpu_check.py checkpoint DIR [--small]         # random 2B-sized Qwen3-VL + tokenizer, HF layout
    python bench/gpu_check.py data DIR                          # train.jsonl / test.jsonl + images
    python bench/gpu_check.py decode DIR [--G 8 --N 512]         # the engine's step: ms, kernels, busy fraction
    python bench/gpu_check.py sampler DIR [--G 8 --N 512 --P 16 --N_batch 128 --runs 3]   # vs HF generate
    python bench/gpu_check.py mismatch DIR [--P 8 --N 256]       # sampler vs training-forward log-probs
    python bench/gpu_check.py grpo DIR [--P 8 --N 512 --steps 3] # full GRPO steps, time split
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


def sampler_prompt(cfg, device, seed: int = 0) -> dict:
    """One image (IMAGE_SIDE px square) between random text tokens, as Processor.encode would lay it out."""
    g = torch.Generator().manual_seed(seed)
    grid = (1, IMAGE_SIDE // 16, IMAGE_SIDE // 16)
    n_image = grid[1] * grid[2] // 4
    text = torch.randint(0, min(cfg.text.vocab_size, cfg.image_token_id) - 1, (TEXT_TOKENS,), generator=g)
    ids = torch.cat([text[:16], torch.tensor([cfg.vision_start_token_id] + [cfg.image_token_id] * n_image +
                                             [cfg.vision_end_token_id]), text[16:]])
    pixels = torch.randn(grid[1] * grid[2], 3 * 2 * 16 * 16, generator=g)
    return {"input_ids": ids.to(device), "pixel_values": pixels.to(device),
            "image_grid_thw": torch.tensor([grid], device=device)}


def setting():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, (torch.bfloat16 if device.type == "cuda" else torch.float32)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_runs(call, runs: int, device) -> dict:
    """One warm-up call (graphs captured, kernels chosen), then `runs` timed calls; peak GPU memory over them."""
    call()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        call()
        sync(device)
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return {"times_s": times, "median_s": statistics.median(times), "peak_gpu_bytes": peak}


def kernel_profile(fn, steps: int, device) -> dict:
    """Kernels launched per call of fn and the GPU's busy fraction (union of kernel intervals / wall span)."""
    if device.type != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile
    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        wall_us = (time.perf_counter() - t) * 1e6
    kernels = [e for e in prof.events()
               if getattr(e.device_type, "name", "") == "CUDA" and e.time_range.end > e.time_range.start]
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy, end = 0.0, float("-inf")
    for a, b in spans:  # union of intervals
        if b > end:
            busy += b - max(a, end)
            end = b
    by_name = {}
    for e in kernels:  # where the kernel time goes, per call
        t = by_name.setdefault(e.name[:90], [0, 0.0])
        t[0] += 1
        t[1] += e.time_range.end - e.time_range.start
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:25]
    return {"kernels_per_call": len(spans) / steps, "busy_fraction": busy / wall_us if wall_us else 0.0,
            "wall_ms_per_call": wall_us / 1e3 / steps,
            "top_kernels": [{"name": n, "per_call": c / steps, "us_per_call": t / steps} for n, (c, t) in top]}


def cmd_decode(args) -> dict:
    """The engine's decode step on its own: ms per step for 8 / 64 / 256 rows (1 / 8 / 32 groups of G=8 after the
    sampler prompt) at two response-length buckets, CUDA graph vs eager, kernels per step, GPU busy fraction, against
    the bandwidth bound (text weight bytes / measured copy bandwidth)."""
    from rollout import randomness
    from rollout import engine
    import model as vlm
    from bench.sampler import count_ops
    device, dtype = setting()
    G, N = args.G, args.N
    net = vlm.load(args.dir, device=device, dtype=dtype)
    t = net.config.text
    text_bytes = sum(p.numel() * p.element_size() for n, p in net.named_parameters() if not n.startswith("visual."))
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "G": G, "N": N,
           "text_weight_bytes": text_bytes, "layers": t.num_hidden_layers}
    if device.type == "cuda":  # the copy bandwidth, read + write, on a 2 GiB buffer
        a = torch.empty(2 ** 30, dtype=torch.uint8, device=device)
        b = torch.empty_like(a)
        ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        b.copy_(a)
        ev0.record()
        for _ in range(10):
            b.copy_(a)
        ev1.record()
        sync(device)
        out["copy_bw_bytes_per_s"] = 2 * a.numel() * 10 / (ev0.elapsed_time(ev1) / 1e3)
        out["bandwidth_bound_ms"] = text_bytes / out["copy_bw_bytes_per_s"] * 1e3
        del a, b
    groups = [1, 8, 32] if not args.small else [1, 2]
    prompt = sampler_prompt(net.config, device)
    eng = engine.Engine(net)
    t0 = time.perf_counter()
    eng.generate([prompt] * groups[-1], group_size=G, max_new_tokens=N, temperature=1.0, seed=0)  # builds + captures
    sync(device)
    st = eng.state
    out["setup_s"], out["graphs"], out["capture_s"] = time.perf_counter() - t0, len(st.graphs), st.capture_s
    st.reset()
    st.admit(list(range(groups[-1])), [prompt] * groups[-1], randomness.row_keys(0, groups[-1], G), 0)
    lengths = sorted({engine._bucket(min(N, max(N // 2, 16)), engine.length_buckets(N)), N})
    rows = {}
    for g in groups:
        R = g * G
        for Ls in lengths:
            key = f"{R}x{Ls}"
            graph = (R, Ls) in st.graphs
            for _ in range(3):
                st.run(R, Ls)
            sync(device)
            n = 50 if graph else 5
            t1 = time.perf_counter()
            for _ in range(n):
                st.run(R, Ls)
            sync(device)
            rows[key] = {"rows": R, "length": Ls, "graph": graph, "ms": (time.perf_counter() - t1) / n * 1e3}
            if graph:  # the same step without the graph
                captured = st.graphs.pop((R, Ls))
                t1 = time.perf_counter()
                for _ in range(5):
                    st.run(R, Ls)
                sync(device)
                rows[key]["eager_ms"] = (time.perf_counter() - t1) / 5 * 1e3
                st.graphs[(R, Ls)] = captured
        rows[f"{R}x{lengths[0]}"].update(kernel_profile(lambda: st.run(R, lengths[0]), 10, device))
    out["steps"] = rows
    for v in rows.values():  # the kernel mix, for the log
        for k in v.get("top_kernels", [])[:12]:
            print(f"{v['rows']:>4} rows: {k['us_per_call']:8.1f} us  x{k['per_call']:5.0f}  {k['name']}", flush=True)
    st.rows, st.length = G, lengths[0]
    with st.autocast():
        out.update(count_ops(st.step))
    if device.type == "cuda":
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    lines = [f"{v['rows']:>4} rows x {v['length']:>4} positions: {v['ms']:.2f} ms/step"
             + (f" (eager {v['eager_ms']:.1f})" if "eager_ms" in v else "")
             + (f", {v['kernels_per_call']:.0f} kernels, GPU busy {100 * v['busy_fraction']:.0f}%"
                if "kernels_per_call" in v else "") for v in rows.values()]
    bound = f", bandwidth bound {out['bandwidth_bound_ms']:.2f} ms" if "bandwidth_bound_ms" in out else ""
    print("SUMMARY decode step (" + f"{out['ops_without_views']} tensor ops ({out['ops']} with views), "
          f"{out['graphs']} graphs captured in {out['capture_s']:.1f}s{bound}): "
          + "; ".join(lines), flush=True)
    return out


def cmd_sampler(args) -> dict:
    """The engine (bf16, CUDA graphs, kept across calls as the trainer keeps it) vs HF generate
    (num_return_sequences=G, its dynamic KV cache), same weights, exactly G x N new tokens on both sides (no stop
    tokens / min_new_tokens = N), for 1 prompt x G and P prompts x G."""
    from rollout import engine
    import model as vlm
    device, dtype = setting()
    G, runs = args.G, args.runs
    settings = [(1, args.N), (args.P, args.N_batch)]
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "G": G, "dtype": str(dtype)}
    net = vlm.load(args.dir, device=device, dtype=dtype)
    prompts = [sampler_prompt(net.config, device, seed=i) for i in range(max(P for P, _ in settings))]
    out["prompt_tokens"] = int(prompts[0]["input_ids"].numel())
    for P, N in settings:
        eng = engine.Engine(net)

        def ours():
            ro = eng.generate(prompts[:P], group_size=G, max_new_tokens=N, temperature=1.0, seed=0)
            assert int(ro.response_mask.sum()) == P * G * N, "ours stopped early"
        out[f"ours_{P}x{G}"] = timed_runs(ours, runs, device)
        out[f"ours_{P}x{G}"]["tokens_per_s"] = P * G * N / out[f"ours_{P}x{G}"]["median_s"]
    del net
    if device.type == "cuda":
        torch.cuda.empty_cache()

    from transformers import GenerationConfig, Qwen3VLForConditionalGeneration
    hf = Qwen3VLForConditionalGeneration.from_pretrained(args.dir, dtype=dtype).to(device).eval()
    for P, N in settings:
        ids = torch.stack([p["input_ids"] for p in prompts[:P]])
        inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                      pixel_values=torch.cat([p["pixel_values"] for p in prompts[:P]]),
                      image_grid_thw=torch.cat([p["image_grid_thw"] for p in prompts[:P]]))
        if "mm_token_type_ids" in inspect.signature(hf.forward).parameters:  # transformers >= 5.2x wants it
            inputs["mm_token_type_ids"] = (ids == hf.config.image_token_id).int()

        def theirs():
            gen = GenerationConfig(do_sample=True, num_return_sequences=G, max_new_tokens=N, min_new_tokens=N,
                                   temperature=1.0, top_k=0, top_p=1.0, use_cache=True, eos_token_id=None,
                                   pad_token_id=0)
            with torch.inference_mode():
                seqs = hf.generate(**inputs, generation_config=gen)
            assert seqs.shape == (P * G, ids.shape[1] + N), f"HF generated {tuple(seqs.shape)}"
        out[f"hf_{P}x{G}"] = timed_runs(theirs, runs, device)
        out[f"hf_{P}x{G}"]["tokens_per_s"] = P * G * N / out[f"hf_{P}x{G}"]["median_s"]
    parts = []
    for P, N in settings:
        o, h = out[f"ours_{P}x{G}"], out[f"hf_{P}x{G}"]
        out[f"speedup_{P}x{G}"] = h["median_s"] / o["median_s"]
        parts.append(f"{P}x{G} prompts, {N} new tokens: ours {o['tokens_per_s']:.0f} tok/s (peak "
                     f"{o['peak_gpu_bytes'] / 2**30:.1f} GiB), HF {h['tokens_per_s']:.0f} tok/s (peak "
                     f"{h['peak_gpu_bytes'] / 2**30:.1f} GiB): x{out[f'speedup_{P}x{G}']:.2f}")
    print(f"SUMMARY {out['device']} {dtype} prompt={out['prompt_tokens']} tokens; " + "; ".join(parts), flush=True)
    return out


def bench_config(args, ckpt: str, **kw):
    from config import Config
    device, _ = setting()
    base = dict(model=ckpt, data="bench", prompts_per_step=args.P, group_size=args.G, mini_batch_prompts=args.P,
                micro_batch_size=args.micro, max_new_tokens=args.N, max_prompt_len=4096, temperature=1.0,
                kl_coef=0.01, lr=1e-6, device=device.type, dtype="auto" if device.type == "cuda" else "fp32",
                step_guided=False, eval_every=0, save_every=0)
    return Config(**{**base, **kw})


def cmd_mismatch(args) -> dict:
    """Sampler vs trainer in the trainer's precision (fp32 master weights, bf16 autocast on CUDA): P prompts x G
    samples of N tokens from the engine, their log-probs recomputed by the training forward (logprobs.micro_logprobs,
    shared prefix); mean and max |delta| over all rollout tokens, and the token-level KL estimates k1 = E[delta]
    and k3 = E[exp(-delta) + delta - 1] (delta = logp_sampler - logp_train, tokens drawn by the sampler)."""
    from rollout import engine
    import model as vlm
    from logprobs import all_logprobs
    from runtime.parallel import autocast_ctx
    device, _ = setting()
    cfg = bench_config(args, args.dir)
    net = vlm.load(args.dir, device=device, dtype=torch.float32)
    prompts = [{k: v.cpu() for k, v in sampler_prompt(net.config, device, seed=i).items()} for i in range(args.P)]
    eng = engine.Engine(net)
    with torch.no_grad(), autocast_ctx(cfg, device):
        ro = eng.generate(prompts, group_size=args.G, max_new_tokens=args.N, temperature=1.0,
                          prompt_seeds=list(range(args.P)))
    mask = ro.response_mask.bool()

    def forward_logprobs(**kw):  # the training forward of every rollout row, micro-batch by micro-batch
        return all_logprobs(net, prompts, ro, bench_config(args, args.dir, **kw), device, 0)
    recomputed = forward_logprobs()
    delta = (ro.logprobs - recomputed)[mask].double()
    out = {"tokens": int(mask.sum()), "mean_abs": float(delta.abs().mean()), "max_abs": float(delta.abs().max()),
           "k1": float(delta.mean()), "k3": float((torch.exp(-delta) + delta - 1).mean()),
           "precision": "fp32 weights, bf16 autocast" if device.type == "cuda" else "fp32"}
    # context: how far the trainer is from itself (per-row forward vs shared-prefix forward, both in its precision),
    # and how far each side is from the same forward in fp32
    per_row = forward_logprobs(shared_prefix=False)
    fp32 = forward_logprobs(dtype="fp32")
    for name, a, b in (("trainer_shared_vs_per_row", recomputed, per_row), ("sampler_vs_fp32", ro.logprobs, fp32),
                       ("trainer_vs_fp32", recomputed, fp32)):
        out[name] = float((a - b)[mask].abs().mean())
    print(f"SUMMARY sampler vs training forward ({out['precision']}, {out['tokens']} tokens): mean |dlogp| "
          f"{out['mean_abs']:.2e}, max {out['max_abs']:.2e}, KL k1 {out['k1']:.2e}, k3 {out['k3']:.2e}; for scale: "
          f"trainer shared-prefix vs per-row forward {out['trainer_shared_vs_per_row']:.2e}, sampler vs fp32 forward "
          f"{out['sampler_vs_fp32']:.2e}, trainer vs fp32 forward {out['trainer_vs_fp32']:.2e}", flush=True)
    return out


def cmd_grpo(args) -> dict:
    """Full GRPO steps as train.py runs them (fp32 master weights, bf16 autocast, bf16 frozen reference, AdamW,
    KL 0.01, shared-prefix training forward, old log-probs recomputed), P prompts x G x N new tokens, `steps` steps;
    the last step's time split into rollout, old log-probs, reference forward, policy forward (+ loss), backward,
    optimizer (clip + AdamW), each phase bracketed by device synchronisations. Rewards are seeded random numbers
    (the reward is CPU string work)."""
    from rollout import engine
    import grpo
    import train
    from runtime.parallel import autocast_ctx, rollout_kv_budget
    device, _ = setting()
    cfg = bench_config(args, args.dir)
    wrapped, net = train.build_policy(args.dir, cfg, device, world=1)
    ref = train.build_reference(args.dir, cfg, device, net)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    scheduler = train.make_scheduler(optimizer, cfg, args.steps)
    prompts = [{k: v.cpu() for k, v in sampler_prompt(net.config, device, seed=i).items()} for i in range(args.P)]
    eng = engine.Engine(net, kv_budget_bytes=rollout_kv_budget(cfg, net, device))
    phases = {}

    def timed(owner, name, label):
        fn = getattr(owner, name)

        def wrapper(*a, **k):
            key = label(*a, **k) if callable(label) else label
            sync(device)
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                sync(device)
                phases[key] = phases.get(key, 0.0) + time.perf_counter() - t
        setattr(owner, name, wrapper)
    timed(train, "micro_logprobs", lambda model, *a, **k: "reference forward" if model is ref.model else "policy forward")
    timed(train, "behaviour_logprobs", "old log-probs (recomputed under bf16)")
    timed(torch.Tensor, "backward", "backward")
    timed(torch.nn.utils, "clip_grad_norm_", "optimizer (clip + AdamW)")
    timed(type(optimizer), "step", "optimizer (clip + AdamW)")
    net.train()
    steps = []
    gen = torch.Generator().manual_seed(0)
    for step in range(args.steps):
        phases.clear()
        sync(device)
        t0 = time.perf_counter()
        with train.RolloutPolicy(wrapped, net, False), torch.no_grad(), autocast_ctx(cfg, device):
            ro = eng.generate(prompts, group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                              temperature=cfg.temperature, prompt_seeds=[step * 1000 + i for i in range(args.P)])
        sync(device)
        phases["rollout"] = time.perf_counter() - t0
        B = ro.response_ids.shape[0]
        batch = dict(ids=list(range(args.P)), prompts=prompts, ro=ro, reward=torch.rand(B, generator=gen),
                     comps=[{}] * B, labels=[{}] * B)
        train.grpo_update(wrapped, ref, optimizer, scheduler, grpo.FixedKLController(cfg.kl_coef), batch, cfg, device,
                          0, 1, 0)
        sync(device)
        steps.append({"step_s": time.perf_counter() - t0, "phases": dict(phases),
                      "tokens": int(ro.response_mask.sum()), "rollout_stats": {
                          k: v for k, v in ro.stats.items() if isinstance(v, (int, float))}})
    last = steps[-1]
    out = {"steps": steps, "P": args.P, "G": args.G, "N": args.N,
           "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else 0}
    split = ", ".join(f"{k} {v:.2f}" for k, v in last["phases"].items())
    print(f"SUMMARY GRPO step {args.P} prompts x G={args.G} x {args.N} new tokens ({last['tokens']} tokens), step "
          f"{len(steps)}: {last['step_s']:.2f} s = {split} (first step {steps[0]['step_s']:.1f} s with graph "
          f"capture); peak {out['peak_gpu_bytes'] / 2**30:.1f} GiB", flush=True)
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
    stages = {"checkpoint": cmd_checkpoint, "data": cmd_data, "decode": cmd_decode, "sampler": cmd_sampler,
              "mismatch": cmd_mismatch, "grpo": cmd_grpo}
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
    args = ap.parse_args(argv)
    fn = stages[args.stage]
    print("RESULT " + json.dumps({"stage": args.stage, **fn(args)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
