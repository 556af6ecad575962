"""The GPU check's update stages (bench/gpu_check.py runs them): full GRPO steps with their time split."""
import time

import torch

from bench.gpu_kit import bench_config, sampler_prompt, setting, sync


def cmd_grpo(args) -> dict:
    """Full GRPO steps as train.py runs them (fp32 master weights, bf16 autocast, bf16 frozen reference, AdamW,
    KL 0.01, shared-prefix training forward, old log-probs recomputed), P prompts x G x N new tokens, `steps` steps;
    the last step's time split into rollout, old log-probs, reference forward, policy forward (+ loss), backward,
    optimizer (clip + AdamW), each phase bracketed by device synchronisations. Rewards are seeded random numbers
    (the reward is CPU string work)."""
    import grpo
    import train
    from rollout import engine
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
        with torch.no_grad(), autocast_ctx(cfg, device):
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


def cmd_update(args) -> dict:
    """One update micro-batch at the paper's shape: an 8B-sized random Qwen3-VL (bf16 weights, activation
    checkpointing), 8 rows of a ~1,000-token image prompt + 4,096 response tokens, forward + backward of the
    log-probs; today's path (no masks, grouped keys, chunked head) vs the masked path it replaced (whole logits), each
    where it fits: peak memory, tokens/s and model-FLOPs utilization (6 x text parameters x tokens, plus attention,
    over the GPU's dense bf16 peak)."""
    import sys

    from torch.distributed._composable import checkpoint
    sys.path.insert(0, "tests")
    from bench.gpu_kit import random_model
    from bench.update_memory import batch_of, replaced, today
    device, dtype = setting()
    net = random_model("small" if args.small else "8b", device, dtype).train()
    for block in net.decoder_blocks():
        checkpoint(block)
    t = net.config.text
    prompt_len, R = (200, 64) if args.small else (1000, 4096)
    batch = {k: v.to(device) for k, v in batch_of(net.config, prompt_len, args.rows, [R] * args.rows).items()}
    tokens = args.rows * R + prompt_len
    text_params = sum(p.numel() for n, p in net.named_parameters() if not n.startswith("visual."))
    attention = 12 * t.num_hidden_layers * t.num_attention_heads * t.head_dim * args.rows * R * (prompt_len + R / 2)
    flops = 6 * text_params * tokens + attention
    peak_flops = 989e12 if device.type == "cuda" else 1e12  # H100 / H200 dense bf16
    out = {"rows": args.rows, "prompt": prompt_len, "response": R, "tokens": tokens}
    for name, fn in (("today", today), ("replaced", replaced)):
        try:
            net.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            t0 = time.perf_counter()
            logp, anchor = fn(net, batch, autocast=False)
            ((logp * batch["response_mask"]).sum() + anchor).backward()
            sync(device)
            wall = time.perf_counter() - t0
            out[name] = {"s": wall, "tokens_per_s": tokens / wall, "mfu": flops / wall / peak_flops,
                         "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else 0}
        except torch.OutOfMemoryError:
            out[name] = {"oom": True}
        net.zero_grad(set_to_none=True)
    parts = [f"{k}: " + ("out of memory" if v.get("oom") else
                         f"{v['peak_gpu_bytes'] / 2**30:.1f} GiB, {v['tokens_per_s']:.0f} tok/s, MFU "
                         f"{100 * v['mfu']:.0f}%") for k, v in out.items() if isinstance(v, dict)]
    print(f"SUMMARY update micro-batch ({'small' if args.small else '8B'}, bf16, activation checkpointing, "
          f"{args.rows} x ({prompt_len} + {R}) tokens): " + "; ".join(parts), flush=True)
    return out
