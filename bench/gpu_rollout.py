"""The GPU check's rollout stages (bench/gpu_check.py runs them): the engine's decode step (graphs vs eager, compiled
vs eager, under FSDP2 vs plain), its tokens/s against Hugging Face generate, its log-probs against the training
forward, and a rollout at the paper's shape (8B-sized, ~1,000-token image prompts, responses of every length under a
fixed KV budget)."""
import inspect
import os
import time

import torch

from bench.gpu_kit import bench_config, kernel_profile, random_model, sampler_prompt, setting, sync, timed_runs


def bandwidth_bound(net, device) -> dict:
    """Text weight bytes and the copy bandwidth (read + write, a 2 GiB buffer): a decode step reads every text weight
    once, so bytes / bandwidth is the fastest a step can be at few rows."""
    text_bytes = sum(p.numel() * p.element_size() for n, p in net.named_parameters() if not n.startswith("visual."))
    out = {"text_weight_bytes": text_bytes}
    if device.type == "cuda":
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
    return out


def step_times(eng, prompt, groups: list[int], G: int, N: int, device, eager_too: bool = True,
               profile: bool = True) -> dict:
    """ms per decode step for each group count (rows = G x groups) at two response-length buckets, with the
    engine's graphs (captured on first use) and, for comparison, eagerly; kernels per step and the GPU's busy
    fraction at the shortest length."""
    from rollout import engine
    st, shape = eng.ready([prompt] * groups[-1], group_size=G, max_new_tokens=N, steps=N)
    lengths = sorted({engine._bucket(min(N, max(N // 2, 16)), engine.length_buckets(N)), N})
    rows = {}
    for g in groups:
        R = g * G
        for Ls in lengths:
            step = shape._replace(rows=R, length=Ls)
            for _ in range(3):
                st.run(step)  # the first run captures the graph
            sync(device)
            graph = step in st.graphs
            n = 50 if graph else 5
            t1 = time.perf_counter()
            for _ in range(n):
                st.run(step)
            sync(device)
            key = f"{R}x{Ls}"
            rows[key] = {"rows": R, "length": Ls, "graph": graph, "ms": (time.perf_counter() - t1) / n * 1e3}
            if graph and eager_too:  # the same step without the graph
                captured = st.graphs.pop(step)
                st.cuda_graphs = False
                t1 = time.perf_counter()
                for _ in range(5):
                    st.run(step)
                sync(device)
                rows[key]["eager_ms"] = (time.perf_counter() - t1) / 5 * 1e3
                st.graphs[step], st.cuda_graphs = captured, True
        if profile:
            step = shape._replace(rows=R, length=lengths[0])
            rows[f"{R}x{lengths[0]}"].update(kernel_profile(lambda: st.run(step), 10, device))
    return {"steps": rows, "graphs": len(st.graphs), "capture_s": st.capture_s}


def step_lines(rows: dict) -> str:
    return "; ".join(f"{v['rows']:>4} rows x {v['length']:>4} positions: {v['ms']:.2f} ms/step"
                     + (f" (eager {v['eager_ms']:.1f})" if "eager_ms" in v else "")
                     + (f", {v['kernels_per_call']:.0f} kernels, GPU busy {100 * v['busy_fraction']:.0f}%"
                        if "kernels_per_call" in v else "") for v in rows.values())


def cmd_decode(args) -> dict:
    """The engine's decode step on its own: ms per step for 8 / 64 / 256 rows (1 / 8 / 32 groups of G=8 after the
    sampler prompt) at two response-length buckets, CUDA graph vs eager, kernels per step, GPU busy fraction, against
    the bandwidth bound."""
    from bench.sampler import count_ops
    from rollout import engine
    import model as vlm
    device, dtype = setting()
    G, N = args.G, args.N
    net = vlm.load(args.dir, device=device, dtype=dtype)
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "G": G, "N": N,
           "layers": net.config.text.num_hidden_layers, **bandwidth_bound(net, device)}
    groups = [1, 8, 32] if not args.small else [1, 2]
    prompt = sampler_prompt(net.config, device)
    eng = engine.Engine(net)
    out.update(step_times(eng, prompt, groups, G, N, device))
    for v in out["steps"].values():  # the kernel mix, for the log
        for k in v.get("top_kernels", [])[:12]:
            print(f"{v['rows']:>4} rows: {k['us_per_call']:8.1f} us  x{k['per_call']:5.0f}  {k['name']}", flush=True)
    st, shape = eng.ready([prompt], group_size=G, max_new_tokens=N, steps=8)
    with torch.no_grad(), st.autocast():
        out.update(count_ops(lambda: st.step(shape)))
    if device.type == "cuda":
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    bound = f", bandwidth bound {out['bandwidth_bound_ms']:.2f} ms" if "bandwidth_bound_ms" in out else ""
    print("SUMMARY decode step (" + f"{out['ops_without_views']} tensor ops ({out['ops']} with views), "
          f"{out['graphs']} graphs captured in {out['capture_s']:.1f}s{bound}): " + step_lines(out["steps"]),
          flush=True)
    return out


def cmd_compile(args) -> dict:
    """--compile_rollout: the decode step with every decoder layer through one torch.compile, captured by the
    engine's graphs, vs the eager-layer step (also graphed): ms per step at 8 / 64 / 256 rows, the compile time, and
    kernels per step."""
    from rollout import engine
    import model as vlm
    device, dtype = setting()
    G, N = args.G, args.N
    net = vlm.load(args.dir, device=device, dtype=dtype)
    groups = [1, 8, 32] if not args.small else [1, 2]
    prompt = sampler_prompt(net.config, device)
    out = {"layers": net.config.text.num_hidden_layers}
    for name, compile in (("eager_layers", False), ("compiled", True)):
        eng = engine.Engine(net, compile=compile)
        t0 = time.perf_counter()
        out[name] = step_times(eng, prompt, groups, G, N, device, eager_too=False)
        out[name]["first_s"] = time.perf_counter() - t0
        out[name]["compile_s"] = eng.compile_s
    parts = []
    for key, v in out["compiled"]["steps"].items():
        e = out["eager_layers"]["steps"][key]
        parts.append(f"{v['rows']} rows x {v['length']}: {v['ms']:.2f} vs {e['ms']:.2f} ms"
                     + (f" ({v['kernels_per_call']:.0f} vs {e['kernels_per_call']:.0f} kernels)"
                        if "kernels_per_call" in v else ""))
    compile_s = out["compiled"]["compile_s"]
    print(f"SUMMARY compiled vs eager layers (both graphed), compile {compile_s or 0:.1f}s once for "
          f"{out['layers']} layers: " + "; ".join(parts), flush=True)
    return out


def cmd_fsdp_decode(args) -> dict:
    """Under torchrun --nproc_per_node=1: the policy as train.py shards it (FSDP2 per decoder block, then the root,
    bf16 compute), decoded through the engine's whole copy of its weights with CUDA graphs, vs the plain engine on the
    same bf16 weights: ms per step at 8 / 64 / 256 rows, and the refresh (one unit gathered at a time)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from rollout import engine
    import model as vlm
    device, dtype = setting()
    G, N = args.G, args.N
    groups = [1, 8, 32] if not args.small else [1, 2]
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    plain = vlm.load(args.dir, device=device, dtype=dtype)
    prompt = sampler_prompt(plain.config, device)
    out = {"plain": step_times(engine.Engine(plain), prompt, groups, G, N, device, eager_too=False, profile=False)}
    del plain
    net = vlm.load(args.dir, device=device, dtype=torch.float32)
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in net.decoder_blocks():
        fully_shard(block, mp_policy=mp)
    fully_shard(net, mp_policy=mp)
    with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
        eng = engine.Engine(net)
        out["fsdp2"] = step_times(eng, prompt, groups, G, N, device, eager_too=False, profile=False)
        t0 = time.perf_counter()
        eng.state.refresh()
        sync(device)
        out["refresh_s"] = time.perf_counter() - t0
    out["copy_bytes"] = eng.state.weights.nbytes
    parts = []
    for key, v in out["fsdp2"]["steps"].items():
        p = out["plain"]["steps"][key]
        parts.append(f"{v['rows']} rows x {v['length']}: {v['ms']:.2f} vs {p['ms']:.2f} ms ({v['ms'] / p['ms']:.2f}x)")
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"SUMMARY FSDP2 (copy {out['copy_bytes'] / 2**30:.1f} GiB, refresh {out['refresh_s']:.2f}s) vs plain "
              "engine, both graphed: " + "; ".join(parts), flush=True)
    dist.destroy_process_group()
    return out


def cmd_paper_rollout(args) -> dict:
    """The paper's shape on one GPU: an 8B-sized random Qwen3-VL (bf16, built in memory), P prompts of ~1,000 tokens
    with a 448 px image, G=8, responses of every length (a set of stop tokens that random weights hit about once per
    `mean` tokens, cut at N) under a fixed KV budget (paged): rows in flight, preemptions, tokens/s, peak memory."""
    from rollout import engine
    device, dtype = setting()
    net = random_model("small" if args.small else "8b", device, dtype)
    V = net.config.text.vocab_size
    prompts = [sampler_prompt(net.config, device, seed=i, text_tokens=args.prompt_text) for i in range(args.P)]
    stops = range(1000, 1000 + max(1, V // args.mean))
    budget = int(args.budget_gb * 2 ** 30)
    eng = engine.Engine(net, kv_budget_bytes=budget, max_prompt_len=int(prompts[0]["input_ids"].numel()))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    ro = eng.generate(prompts, group_size=args.G, max_new_tokens=args.N, temperature=1.0, stop_token_ids=stops)
    sync(device)
    wall = time.perf_counter() - t0
    lengths = ro.response_mask.sum(1)
    s = ro.stats
    out = {"prompt_tokens": int(prompts[0]["input_ids"].numel()), "P": args.P, "G": args.G, "N": args.N,
           "budget_gb": args.budget_gb, "wall_s": wall, "tokens": int(lengths.sum()),
           "tokens_per_s": float(lengths.sum()) / wall, "mean_len": float(lengths.float().mean()),
           "cut": float((lengths == args.N).float().mean()),
           "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else 0,
           **{k: v for k, v in s.items() if isinstance(v, (int, float))}}
    print(f"SUMMARY paper shape ({'small' if args.small else '8B'}, bf16, {args.P} prompts of {out['prompt_tokens']} "
          f"tokens x G={args.G}, responses mean {out['mean_len']:.0f} / cut {100 * out['cut']:.0f}% at {args.N}, "
          f"KV budget {args.budget_gb:g} GiB paged): {out['tokens_per_s']:.0f} tok/s, rows in flight "
          f"{s['rows_in_flight']:.0f}, {s['preemptions']} preemptions, {s['steps']} steps in {wall:.0f}s (capture "
          f"{s['capture_s']:.0f}s), peak {out['peak_gpu_bytes'] / 2**30:.1f} GiB", flush=True)
    return out


def cmd_sampler(args) -> dict:
    """The engine (bf16, CUDA graphs, kept across calls as the trainer keeps it) vs HF generate
    (num_return_sequences=G, its dynamic KV cache), same weights, exactly G x N new tokens on both sides (no stop
    tokens / min_new_tokens = N), for 1 prompt x G and P prompts x G."""
    import model as vlm
    from rollout import engine
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


def cmd_mismatch(args) -> dict:
    """Sampler vs trainer in the trainer's precision (fp32 master weights, bf16 autocast on CUDA): P prompts x G
    samples of N tokens from the engine, their log-probs recomputed by the training forward (logprobs.micro_logprobs,
    shared prefix); mean and max |delta| over all rollout tokens, and the token-level KL estimates k1 = E[delta]
    and k3 = E[exp(-delta) + delta - 1] (delta = logp_sampler - logp_train, tokens drawn by the sampler)."""
    import model as vlm
    from logprobs import all_logprobs
    from rollout import engine
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
