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
