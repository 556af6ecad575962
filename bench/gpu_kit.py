"""What the GPU check's stages share (bench/gpu_check.py): model shapes, the prompt, timing and kernel profiling."""
import statistics
import time

import torch

IMAGE_SIDE = 448   # 28 x 28 patches of 16 px -> 196 image tokens after the 2 x 2 merge
TEXT_TOKENS = 128  # random text tokens around the image in the sampler prompt


def qwen3vl_config(special: dict, size: str = "2b"):
    """Qwen3-VL shapes: "2b" (text 2048 wide, 28 layers, 16 heads / 8 kv heads of 128, SwiGLU 6144, tied 151936-token
    vocabulary; ViT 24 blocks of 1024, DeepStack after blocks 5, 11, 17), "8b" (text 4096 wide, 36 layers, 32 / 8 heads,
    SwiGLU 12288, untied; ViT 27 blocks of 1152, DeepStack after 8, 16, 24), or "small", a tiny stand-in so that the
    plumbing runs on a CPU. special: the tokenizer's special token ids."""
    from model.config import Qwen3VLConfig, TextConfig, VisionConfig
    from runtime.memory_plan import qwen3vl_preset
    if size == "small":
        text = TextConfig(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=5_000_000.0,
                          mrope_section=(6, 5, 5), max_position_embeddings=8192)
        vision = VisionConfig(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=16,
                              out_hidden_size=128, num_position_embeddings=256, deepstack_visual_indexes=(0,))
        tied = True
    else:
        preset = qwen3vl_preset(f"qwen3-vl-{size}")
        text, vision, tied = preset.text, preset.vision, preset.tie_word_embeddings
    return Qwen3VLConfig(text=text, vision=vision, image_token_id=special["<|image_pad|>"],
                         video_token_id=special["<|video_pad|>"], vision_start_token_id=special["<|vision_start|>"],
                         vision_end_token_id=special["<|vision_end|>"], tie_word_embeddings=tied)


def random_model(size: str, device, dtype=torch.bfloat16):
    """A random-weight Qwen3-VL of that size built straight on the device in dtype (no checkpoint), with the toy
    tokenizer's special ids: for the paper-shape stages, where writing 17 GB of weights would eat the budget."""
    import model as vlm
    from model.tokenizer import build_tokenizer, special_token_ids
    cfg = qwen3vl_config(special_token_ids(build_tokenizer(corpus(), 1024)), size)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            net = vlm.Qwen3VL(cfg)
    finally:
        torch.set_default_dtype(default)
    return net.init_weights(std=0.02, seed=0).eval()


def corpus() -> list[str]:
    from data import toy
    return toy.corpus()


def sampler_prompt(cfg, device, seed: int = 0, text_tokens: int = TEXT_TOKENS) -> dict:
    """One image (IMAGE_SIDE px square) between random text tokens, as Processor.encode would lay it out."""
    g = torch.Generator().manual_seed(seed)
    grid = (1, IMAGE_SIDE // 16, IMAGE_SIDE // 16)
    n_image = grid[1] * grid[2] // 4
    text = torch.randint(0, min(cfg.text.vocab_size, cfg.image_token_id) - 1, (text_tokens,), generator=g)
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


def bench_config(args, ckpt: str, **kw):
    from config import Config
    device, _ = setting()
    base = dict(model=ckpt, data="bench", prompts_per_step=args.P, group_size=args.G, mini_batch_prompts=args.P,
                micro_batch_size=args.micro, max_new_tokens=args.N, max_prompt_len=4096, temperature=1.0,
                kl_coef=0.01, lr=1e-6, device=device.type, dtype="auto" if device.type == "cuda" else "fp32",
                step_guided=False, eval_every=0, save_every=0)
    return Config(**{**base, **kw})
