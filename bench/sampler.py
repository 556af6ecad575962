"""sample.generate vs Hugging Face generate (num_return_sequences=G) on the same ~25M-parameter random Qwen3-VL:
tokens/s, peak RSS growth and KV-cache bytes, at the CPU reference setting of bench/README.md (1 prompt x G=8, 256-token prompt
with 64 image tokens, 128 new tokens, fp32, 2 threads) and with a 1024-token prompt.

Run: `python bench/sampler.py [--runs 5] [--prompt_lens 256,1024] [--threads 2]`. Per prompt length one child
process loads every engine and interleaves their timed runs (ours, hf, ours, hf, ...) so that load from other
processes hits them alike, and a second child measures memory (see main); both generate exactly G x max_new_tokens
tokens (HF: min_new_tokens = max_new_tokens; ours: no stop tokens). Reported per engine: medians over --runs timed
runs after a warm-up run, as wall-clock tokens/s and tokens per CPU-second of the process (steadier on a shared
machine), peak RSS growth during a call, and KV bytes.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

if __name__ == "__main__":  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

VOCAB = 8192
IMAGE_TOKEN, VISION_START, VISION_END = VOCAB - 10, VOCAB - 12, VOCAB - 11
PATCH, GRID = 16, (1, 16, 16)  # 16 x 16 patches of a 256 x 256 image -> 64 image tokens after the 2 x 2 merge


def bench_config():
    """~26M parameters in the proportions of Qwen3-VL-2B (vision tower ~20%, tied embedding ~15%, decoder ~65%):
    8 text layers of width 384 (6 heads of 64, 2 kv heads, MLP 1536), a tied 8k vocabulary, a 6-block ViT of
    width 192 with DeepStack taps after blocks 1 and 3."""
    from model.config import Qwen3VLConfig, TextConfig, VisionConfig
    text = TextConfig(vocab_size=VOCAB, hidden_size=384, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=64, rope_theta=1_000_000.0,
                      mrope_section=(12, 10, 10), max_position_embeddings=8192)
    vision = VisionConfig(depth=6, hidden_size=192, intermediate_size=768, num_heads=4, patch_size=PATCH,
                          temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=384,
                          num_position_embeddings=256, deepstack_visual_indexes=(1, 3))
    return Qwen3VLConfig(text=text, vision=vision, image_token_id=IMAGE_TOKEN, video_token_id=IMAGE_TOKEN + 1,
                         vision_start_token_id=VISION_START, vision_end_token_id=VISION_END, tie_word_embeddings=True)


def make_checkpoint(path):
    """The same random weights for both engines: seeded weights saved in the Hugging Face layout, which ours and
    transformers' Qwen3VLForConditionalGeneration each load."""
    import model
    net = model.Qwen3VL(bench_config()).init_weights(std=0.05, seed=0)
    model.save(net, path)
    return sum(p.numel() for p in net.parameters())


def make_prompt(prompt_len):
    """{input_ids (T,), pixel_values, image_grid_thw}: a few text tokens, the image, then text up to prompt_len."""
    g = torch.Generator().manual_seed(prompt_len)
    n_image = GRID[0] * GRID[1] * GRID[2] // 4
    text = torch.randint(0, VOCAB - 100, (prompt_len - n_image - 2,), generator=g)
    ids = torch.cat([text[:8], torch.tensor([VISION_START] + [IMAGE_TOKEN] * n_image + [VISION_END]), text[8:]])
    pixels = torch.randn(GRID[0] * GRID[1] * GRID[2], 3 * 2 * PATCH * PATCH, generator=g)
    return {"input_ids": ids, "pixel_values": pixels, "image_grid_thw": torch.tensor([GRID])}


class PeakRSS:
    """Peak resident set size while the block runs (sampled every millisecond from /proc/self/statm), minus the RSS
    at entry: the memory the call itself needed, torch's allocations included (tracemalloc cannot see those)."""

    def __enter__(self):
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.growth = self.peak - self.start


def run_ours(path, prompt, G, N):
    """The rollout engine, kept across calls as the trainer keeps it (its buffers are reused)."""
    from rollout import engine
    import model
    net = model.load(path)
    eng = engine.Engine(net)

    def call():
        ro = eng.generate([prompt], group_size=G, max_new_tokens=N, temperature=1.0, seed=0)
        assert int(ro.response_mask.sum()) == G * N
        return ro.stats["kv_cache_bytes"]
    call.greedy = lambda n: engine.Engine(net).generate([prompt], 1, n, temperature=0.0).response_ids[0].tolist()
    return call


def run_hf(path, prompt, G, N):
    from transformers import GenerationConfig
    from transformers import Qwen3VLForConditionalGeneration as HFModel
    hf = HFModel.from_pretrained(path, dtype=torch.float32).eval()
    ids = prompt["input_ids"][None]
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=prompt["pixel_values"],
                  image_grid_thw=prompt["image_grid_thw"], mm_token_type_ids=(ids == IMAGE_TOKEN).int())
    gen = GenerationConfig(do_sample=True, num_return_sequences=G, max_new_tokens=N, min_new_tokens=N,
                           temperature=1.0, top_k=0, top_p=1.0, use_cache=True, eos_token_id=None, pad_token_id=0,
                           return_dict_in_generate=True)

    def call():
        torch.manual_seed(0)
        with torch.inference_mode():
            out = hf.generate(**inputs, generation_config=gen)
        assert out.sequences.shape == (G, ids.shape[1] + N)
        cache = out.past_key_values
        return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))

    def greedy(n):
        with torch.inference_mode():
            out = hf.generate(**inputs, do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                              pad_token_id=0)
        return out[0, ids.shape[1]:].tolist()
    call.greedy = greedy
    return call


def count_ops(fn) -> dict:
    """Tensor operations one call of fn dispatches (ATen ops as a TorchDispatchMode sees them), with and without
    the views (a view launches no kernel)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.all = self.views = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.all += 1
            self.views += bool(func.is_view)
            return func(*args, **(kwargs or {}))
    with Count() as c:
        fn()
    return {"ops": c.all, "ops_without_views": c.all - c.views}


def decode_step_ops(layers: int, G: int = 8) -> dict:
    """Ops of one engine decode step for G rows of a bench_config model with `layers` decoder layers (the count does
    not depend on the width), after the reference prompt."""
    import dataclasses

    from model.qwen3_vl import Qwen3VL
    from rollout import engine
    cfg = bench_config()
    cfg.text = dataclasses.replace(cfg.text, num_hidden_layers=layers)
    net = Qwen3VL(cfg).init_weights(seed=0).eval()
    st, shape = engine.Engine(net).ready([make_prompt(256)], group_size=G, max_new_tokens=16, steps=8)
    with torch.no_grad():
        return count_ops(lambda: st.step(shape))


def compiled_layer_launches(layers: int = 4, G: int = 8) -> dict:
    """Kernels one compiled decoder layer of the decode step launches on the CPU (--compile_rollout): Inductor's fused
    C++ kernels plus the calls it leaves to ATen (matrix products, gathers), per layer, from the profiler; beside the
    eager layer's ATen ops (without views) for comparison."""
    import dataclasses

    import torch._inductor.config as inductor_config
    from torch.profiler import ProfilerActivity, profile

    from model.qwen3_vl import Qwen3VL
    from rollout import engine
    inductor_config.cpp.enable_kernel_profile = True  # a profiler record per fused kernel
    cfg = bench_config()
    cfg.text = dataclasses.replace(cfg.text, num_hidden_layers=layers)
    net = Qwen3VL(cfg).init_weights(seed=0).eval()
    st, shape = engine.Engine(net, compile=True).ready([make_prompt(256)], group_size=G, max_new_tokens=16, steps=8)
    with torch.no_grad():
        st.step(shape)  # compiles
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            st.step(shape)
    regions = [(e.time_range.start, e.time_range.end) for e in prof.events()
               if e.name.startswith("Torch-Compiled Region")]
    inside = [e for e in prof.events() if any(a <= e.time_range.start and e.time_range.end <= b for a, b in regions)]
    # Inductor's kernels, and the ATen calls it makes for what it does not generate (matrix products)
    launches = [e for e in inside if "cpp_fused" in e.name or e.name in ("aten::mm", "aten::bmm", "aten::addmm")]
    names = {}
    for c in launches:
        name = "fused C++ kernel" if "cpp_fused" in c.name else c.name
        names[name] = names.get(name, 0) + 1
    eager = decode_step_ops(layers, G)["ops_without_views"]
    return {"per_layer": len(launches) / layers, "kernels": {k: v / layers for k, v in sorted(names.items())},
            "eager_ops_per_step": eager}


def child(args):
    """One setting, all engines in this process. --measure time: runs interleaved (ours, hf, ours, hf, ...) so that
    load on the machine hits them alike; --measure memory: one run each under the RSS watcher. Prints one JSON
    line {engine: {...}}."""
    torch.set_num_threads(args.threads)
    prompt = make_prompt(args.prompt_len)
    makers = {"ours": lambda: run_ours(args.path, prompt, args.G, args.N),
              "hf": lambda: run_hf(args.path, prompt, args.G, args.N)}
    calls = {name: makers[name]() for name in args.engines.split(",")}
    out = {name: {} for name in calls}
    if args.measure == "memory":
        for name, call in calls.items():
            call()  # warm-up
            with PeakRSS() as mem:
                out[name]["kv_bytes"] = call()
            out[name]["peak_rss_growth"] = mem.growth
        print(json.dumps(out))
        return
    if "ours" in calls and "hf" in calls:  # the same model on both sides: greedy decoding agrees
        ours, theirs = calls["ours"].greedy(16), calls["hf"].greedy(16)
        if ours != theirs:
            sys.exit(f"greedy tokens differ: ours {ours}, HF {theirs}")
    for name, call in calls.items():
        call()  # warm-up
        out[name].update(times=[], cpu_times=[])
    for _ in range(args.runs):
        for name, call in calls.items():
            t, cpu = time.perf_counter(), time.process_time()
            call()
            out[name]["times"].append(time.perf_counter() - t)
            out[name]["cpu_times"].append(time.process_time() - cpu)
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="timed runs per engine and setting (median reported)")
    ap.add_argument("--prompt_lens", default="256,1024", help="prompt lengths in tokens (64 of them image tokens)")
    ap.add_argument("--G", type=int, default=8, help="group size (HF: num_return_sequences)")
    ap.add_argument("--N", type=int, default=128, help="new tokens per sample")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--engines", default="ours,hf", help="ours and/or hf")
    ap.add_argument("--ops_layers", type=int, default=28,
                    help="also count the tensor ops of one decode step of a model this deep (0: skip)")
    ap.add_argument("--compiled_launches", action="store_true",
                    help="also count the kernels of one compiled decoder layer (compiles a 4-layer model)")
    ap.add_argument("--engine", help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--prompt_len", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--measure", choices=("time", "memory"), default="time", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine:
        return child(args)

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    # Memory runs only: glibc then returns every freed block of >= 64 KiB to the OS at once, so RSS follows the
    # live tensors and the peak is what the call needed. It is not used when timing: every such allocation then
    # costs an mmap/munmap and fresh page faults, which slowed HF generate (a torch.cat-grown cache) by 1.7x and
    # ours by 1.2x (2026-11-28), i.e. it measured the allocator setting more than the engines.
    mem_env = dict(env, MALLOC_MMAP_THRESHOLD_="65536")
    results = {}
    with tempfile.TemporaryDirectory() as path:
        n_params = make_checkpoint(path)
        print(f"model: {n_params / 1e6:.1f}M parameters, fp32, {args.threads} threads; G={args.G}, "
              f"{args.N} new tokens per sample; median of {args.runs} timed runs after a warm-up (memory: a "
              f"separate process)", flush=True)
        for T in [int(x) for x in args.prompt_lens.split(",")]:
            r = {}
            for measure, child_env in (("time", env), ("memory", mem_env)):
                cmd = [sys.executable, os.path.abspath(__file__), "--engine", "child", "--path", path,
                       "--prompt_len", str(T), "--G", str(args.G), "--N", str(args.N), "--runs", str(args.runs),
                       "--threads", str(args.threads), "--engines", args.engines, "--measure", measure]
                out = subprocess.run(cmd, capture_output=True, text=True, env=child_env)
                if out.returncode:
                    sys.exit(f"prompt {T} ({measure}) failed:\n{out.stderr}")
                for engine, d in json.loads(out.stdout.strip().splitlines()[-1]).items():
                    r.setdefault(engine, {}).update(d)
            for engine, d in r.items():
                sec, cpu = statistics.median(d["times"]), statistics.median(d["cpu_times"])
                results[T, engine] = (args.G * args.N / sec, args.G * args.N / cpu)
                print(f"prompt {T:5d}  {engine:16s} {args.G * args.N / sec:7.1f} tokens/s wall ({sec:6.2f} s; runs "
                      f"{', '.join(f'{t:.2f}' for t in d['times'])})  {args.G * args.N / cpu:7.1f} tokens/CPU-s  "
                      f"peak RSS +{d['peak_rss_growth'] / 2**20:6.1f} MiB  KV cache {d['kv_bytes'] / 2**20:6.2f} MiB",
                      flush=True)
    if args.ops_layers:
        ops = decode_step_ops(args.ops_layers, args.G)
        print(f"one decode step of {args.G} rows, {args.ops_layers} decoder layers: {ops['ops_without_views']} "
              f"tensor ops ({ops['ops']} counting views)", flush=True)
    if args.compiled_launches:
        c = compiled_layer_launches()
        print(f"one compiled decoder layer of the step ({args.G} rows): {c['per_layer']:.0f} launches "
              f"({', '.join(f'{k} x{v:g}' for k, v in c['kernels'].items())})", flush=True)
    print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())} on "
          f"{os.cpu_count()} CPUs")
    if "hf" in args.engines and "ours" in args.engines:
        lens = [int(x) for x in args.prompt_lens.split(",")]
        for k, what in ((0, "wall-clock tokens/s"), (1, "tokens per CPU-second")):
            ratios = ", ".join(f"{T}-token prompt {results[T, 'ours'][k] / results[T, 'hf'][k]:.2f}x" for T in lens)
            print(f"ratio ours / HF generate ({what}): {ratios}")


if __name__ == "__main__":
    main()
