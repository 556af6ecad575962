"""One full GRPO step (rollout of G samples + rule reward + loss + backward + AdamW) of ours (train.py) vs TRL's
GRPOTrainer, on the same tiny random Qwen3-VL checkpoint: steps/s and peak RSS, with and without the KL term.

    .venv-bench/bin/python bench/grpo_step.py [--steps 3] [--warmup 1] [--threads 2] [--kl 0.01,0] [--profile]
Needs TRL (bench/requirements-bench.txt, see bench/README.md). Each side runs in its own process (its peak RSS
is that process's ru_maxrss, from os.wait4); the two processes take turns step by step, so both meet the same
machine load. --profile adds a table of where each side's step time goes. The ratios are printed last.
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":  # run as a script, this folder would shadow the top-level modules (rewards.py)
    sys.path[0] = ROOT

from bench.grpo_phases import PHASES, _rss_mib, print_phases, profile_ours, profile_trl  # noqa: E402

# The CPU reference setting (bench/README.md): the size and shape every CPU comparison here uses.
GROUP_SIZE = 8
PROMPT_TOKENS = 256          # the whole rendered prompt, chat template and 64 image tokens included
IMAGE_SIDE = 256             # 256 x 256 px = 16 x 16 patches of 16 px = 64 tokens after the 2 x 2 merge
NEW_TOKENS = 128             # every sample generates exactly this many (no stop token on either side)
LABELS = {"image_tag": "safe", "text_tag": "unsafe", "combine_tag": "unsafe"}
SEED = 0


# ----------------------------------------------------------------------------- the shared checkpoint

def reference_config(vocab_size: int, special: dict):
    """~25M parameters, the shape bench/sampler.py uses: 8 text layers of width 256 (8 heads, 2 kv heads), a 32k
    vocabulary (two thirds of the parameters, as in small Qwen models), a 4-block ViT of width 128."""
    from model.config import Qwen3VLConfig, TextConfig, VisionConfig
    text = TextConfig(vocab_size=vocab_size, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=32, rope_theta=1_000_000.0,
                      mrope_section=(6, 5, 5), max_position_embeddings=8192)
    vision = VisionConfig(depth=4, hidden_size=128, intermediate_size=512, num_heads=4, patch_size=16,
                          temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=256,
                          num_position_embeddings=256, deepstack_visual_indexes=(1, 2))
    return Qwen3VLConfig(text=text, vision=vision, image_token_id=special["<|image_pad|>"],
                         video_token_id=special["<|video_pad|>"], vision_start_token_id=special["<|vision_start|>"],
                         vision_end_token_id=special["<|vision_end|>"], tie_word_embeddings=False)


def tokenizer_corpus() -> list[str]:
    """The toy world's strings plus seeded pseudo-words: enough text for a 32k byte-level BPE vocabulary."""
    from data import toy
    rng = random.Random(SEED)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou", "y")]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(40000)]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(40000)]
    return toy.corpus() + lines


def build_checkpoint(path: str, vocab_size: int = 32000) -> str:
    """Random-weight Qwen3-VL + tokenizer + image settings, in the HF layout both sides load. Built once."""
    import torch

    import model as vlm
    from model.processor import Processor
    from model.tokenizer import build_tokenizer, special_token_ids
    if os.path.isfile(os.path.join(path, "generation_config.json")):
        return path
    tok = build_tokenizer(tokenizer_corpus(), vocab_size)
    cfg = reference_config(vocab_size, special_token_ids(tok))
    torch.manual_seed(SEED)
    net = vlm.Qwen3VL(cfg).init_weights(std=0.02, seed=SEED)
    vlm.save(net, path)
    Processor(tok).save(path)  # tokenizer files + preprocessor_config.json (patch 16, min_pixels 256 x 256)
    stops = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    with open(os.path.join(path, "generation_config.json"), "w") as f:  # Qwen3-VL's: stop on both
        json.dump({"eos_token_id": stops, "pad_token_id": tok.pad_token_id}, f)
    return path


def make_image():
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(SEED)
    return Image.fromarray(rng.integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8))


def make_prompt(processor, image) -> str:
    """A question whose rendered prompt (chat template + image) is exactly PROMPT_TOKENS tokens."""
    rng = random.Random(SEED + 1)
    words = "is it safe to use what is shown in the picture for the thing I asked about here".split()
    text = "Look at the image."
    while processor.encode(text, [image])["input_ids"].numel() < PROMPT_TOKENS:
        text += " " + rng.choice(words)
    while processor.encode(text, [image])["input_ids"].numel() > PROMPT_TOKENS:
        text = text[:-1]  # characters off the end until it fits exactly (single-byte tokens at worst)
    n = processor.encode(text, [image])["input_ids"].numel()
    if n != PROMPT_TOKENS:
        raise RuntimeError(f"could not build a {PROMPT_TOKENS}-token prompt (got {n})")
    return text


class StepClock:
    """Times each step (wall and CPU seconds of all threads) and, under the driver, runs in lock-step with the
    other side: before a step it prints WAIT and blocks until the driver sends a line, after it prints STEP.
    The driver alternates the two sides step by step, so both run under the same machine load."""

    def __init__(self, warmup: int, profile: bool, lockstep: bool):
        self.warmup, self.profile, self.lockstep = warmup, profile, lockstep
        self.wall, self.cpu, self.n = [], [], 0
        if profile and warmup == 0:
            PHASES.reset()

    def begin(self):
        if self.lockstep:
            print("WAIT", flush=True)
            if not sys.stdin.readline():
                sys.exit("the driver went away")
        self._w, self._c = time.perf_counter(), time.process_time()

    def end(self):
        dw, dc = time.perf_counter() - self._w, time.process_time() - self._c
        self.wall.append(dw)
        self.cpu.append(dc)
        self.n += 1
        if self.profile and self.n == self.warmup:
            PHASES.reset()  # the phase totals cover the timed steps only
        if self.lockstep:
            print(f"STEP {dw:.3f} {dc:.3f}", flush=True)


def run_ours(ckpt: str, kl: float, steps: int, warmup: int, threads: int, profile: bool = False,
             lockstep: bool = False) -> dict:
    """The real training code: train.rollout -> train.grpo_update, as main() runs a step."""
    import torch

    import grpo
    import model as vlm
    import rewards
    import train
    from config import Config
    from data.record import Record
    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    device = torch.device("cpu")
    cfg = Config(model=ckpt, data="bench", prompts_per_step=1, group_size=GROUP_SIZE, mini_batch_prompts=1,
                 micro_batch_size=GROUP_SIZE, ppo_epochs=1, lr=1e-6, weight_decay=0.0, grad_clip=1.0,
                 kl_coef=kl, max_new_tokens=NEW_TOKENS, max_prompt_len=PROMPT_TOKENS, temperature=1.0,
                 step_guided=False, device="cpu", dtype="fp32", threads=threads, seed=SEED)
    processor = vlm.load_processor(ckpt)
    processor.stop_token_ids = []  # sample exactly NEW_TOKENS tokens, like TRL's min_new_tokens below
    image = make_image()
    record = Record(id="bench/0", prompt=make_prompt(processor, image), images=[image], labels=LABELS,
                    subset="bench", meta={})
    wrapped, net = train.build_policy(ckpt, cfg, device, world=1)
    ref_model = train.build_reference(ckpt, cfg, device, net)  # None without a KL term
    if profile:
        profile_ours({"ref": ref_model and ref_model.model})
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = train.make_scheduler(optimizer, cfg, steps + warmup)
    reward_fn = rewards.resolve_reward("paper")
    rss_loaded = _rss_mib()
    net.train()
    clock, lengths = StepClock(warmup, profile, lockstep), []
    engine = train.Engine(net)  # kept across steps, as main() keeps it
    for step in range(warmup + steps):
        clock.begin()
        # the prompt is encoded every step, as main() and TRL do
        batch = train.rollout(engine, processor, [record], [0], cfg, step, reward_fn, device)
        train.grpo_update(wrapped, ref_model, optimizer, scheduler, grpo.FixedKLController(kl), batch, cfg, device, 0,
                          1, processor.pad_token_id)
        clock.end()
        lengths.append(float(batch["ro"].response_mask.sum(1).mean()))
    return _result(clock, lengths, rss_loaded, prompt_len=batch["prompts"][0]["input_ids"].numel())


def run_trl(ckpt: str, kl: float, steps: int, warmup: int, threads: int, profile: bool = False,
            lockstep: bool = False) -> dict:
    """TRL 1.16 GRPOTrainer, configured as fast as it goes on CPU: no gradient checkpointing (on by default in
    TRL), fp32 (bf16 is TRL's default), KV cache on (transformers' dynamic cache), no logging or saving, and
    every generation exactly NEW_TOKENS long (min_new_tokens)."""
    import torch
    from datasets import Dataset
    from transformers import (AutoImageProcessor, AutoTokenizer, Qwen3VLForConditionalGeneration,
                              TrainerCallback)
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from trl import GRPOConfig, GRPOTrainer

    import model as vlm
    import rewards
    torch.set_num_threads(threads)
    torch.manual_seed(SEED)

    class ImageOnlyProcessor(Qwen3VLProcessor):
        """Qwen3VLProcessor without its video processor, which needs torchvision (not installed: it would only
        serve videos). Text and image paths are transformers' own."""

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    tok = AutoTokenizer.from_pretrained(ckpt, local_files_only=True)
    processing_class = ImageOnlyProcessor(image_processor=AutoImageProcessor.from_pretrained(ckpt, local_files_only=True),
                                          tokenizer=tok, video_processor=None, chat_template=tok.chat_template)
    image = make_image()
    text = make_prompt(vlm.load_processor(ckpt), image)
    ours = vlm.load_processor(ckpt).encode(text, [image])["input_ids"].tolist()
    theirs = processing_class.apply_chat_template([[{"role": "user", "content": [
        {"type": "image", "image": image}, {"type": "text", "text": text}]}]], add_generation_prompt=True,
        tokenize=True, return_dict=True)["input_ids"][0]
    if list(theirs) != ours:
        raise RuntimeError("TRL's processor renders a different prompt than ours: the comparison would be unfair")

    model = Qwen3VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)
    n_steps = warmup + steps
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": text}], "image": image, **LABELS}
                                 for _ in range(n_steps)])

    def safety_reward(completions, image_tag, text_tag, combine_tag, **kw):
        """rewards.score (paper mode) in TRL's reward-function signature."""
        return [rewards.score(c[0]["content"], {"image_tag": i, "text_tag": t, "combine_tag": ct})[0]
                for c, i, t, ct in zip(completions, image_tag, text_tag, combine_tag)]

    out_dir = tempfile.mkdtemp(prefix="trl_grpo_bench_")
    args = GRPOConfig(
        output_dir=out_dir, max_steps=n_steps, per_device_train_batch_size=GROUP_SIZE, num_generations=GROUP_SIZE,
        gradient_accumulation_steps=1, num_iterations=1, learning_rate=1e-6, weight_decay=0.0, max_grad_norm=1.0,
        lr_scheduler_type="constant", beta=kl, epsilon=0.2, loss_type="dapo", scale_rewards="group",
        max_completion_length=NEW_TOKENS, temperature=1.0, top_p=1.0, top_k=0,
        generation_kwargs={"min_new_tokens": NEW_TOKENS},  # EOS suppressed: exactly NEW_TOKENS per sample
        use_vllm=False, gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True,
        logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, shuffle_dataset=False, log_completions=False, seed=SEED)

    clock, lengths = StepClock(warmup, profile, lockstep), []

    class Clock(TrainerCallback):
        """A step runs from on_step_begin (generation happens inside training_step) to on_step_end (after the
        optimizer step); fetching the next dataset row and logging (switched off) fall outside."""

        def on_step_begin(self, *a, **k):
            clock.begin()

        def on_step_end(self, *a, **k):
            clock.end()
            lengths.append(trainer._metrics["train"]["completions/mean_length"][-1])

    if profile:
        profile_trl()
    trainer = GRPOTrainer(model=model, reward_funcs=[safety_reward], args=args, train_dataset=dataset,
                          processing_class=processing_class, callbacks=[Clock()])
    rss_loaded = _rss_mib()
    trainer.train()
    return _result(clock, lengths, rss_loaded, prompt_len=len(ours))


def _result(clock: StepClock, lengths, rss_loaded, prompt_len) -> dict:
    """Wall and CPU seconds (all threads) of the timed steps, and the phase totals per timed step."""
    times, cpu = clock.wall[clock.warmup:], clock.cpu[clock.warmup:]
    n = max(1, len(times))
    phases = {k: [w / n, c / n, PHASES.rss.get(k, 0.0)] for k, (w, c) in PHASES.totals.items()}
    return {"step_s": times, "median_s": statistics.median(times), "cpu_s": cpu, "median_cpu_s": statistics.median(cpu),
            "response_len": lengths, "prompt_len": prompt_len, "rss_loaded_mib": rss_loaded, "phases": phases}


# ----------------------------------------------------------------------------- driver

def run_sides(sides: list, ckpt: str, kl: float, args) -> dict:
    """Each side in its own process, all alive at once but stepping in turn (ABBA order), so that they meet the
    same machine load; each one's peak RSS is its own process's ru_maxrss (os.wait4)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    procs, errs = {}, {}
    for side in sides:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", side, "--ckpt", ckpt, "--kl", str(kl),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
               "--lockstep"] + (["--profile"] if args.profile else [])
        errs[side] = tempfile.TemporaryFile(mode="w+")
        procs[side] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errs[side],
                                       text=True, cwd=ROOT, env=env)

    def read_until(side: str, tag: str) -> str:
        for line in procs[side].stdout:
            if line.startswith(tag):
                return line[len(tag):].strip()
        procs[side].wait()
        errs[side].seek(0)
        raise RuntimeError(f"{side} (kl={kl}) exited with code {procs[side].returncode} before {tag.strip()}:\n"
                           f"{errs[side].read()[-4000:]}")

    try:
        for i in range(args.warmup + args.steps):
            for side in (sides if i % 2 == 0 else sides[::-1]):
                read_until(side, "WAIT")
                procs[side].stdin.write("GO\n")
                procs[side].stdin.flush()
                read_until(side, "STEP ")
        results = {}
        for side in sides:
            results[side] = json.loads(read_until(side, "RESULT "))
            _, status, usage = os.wait4(procs[side].pid, 0)
            results[side]["peak_rss_mib"] = usage.ru_maxrss / 1024
        return results
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed GRPO steps per side (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads per side")
    ap.add_argument("--kl", default="0.01,0", help="comma-separated kl_coef (ours) = beta (TRL) values")
    ap.add_argument("--sides", default="ours,trl", help="which sides to run")
    ap.add_argument("--ckpt", default=os.path.join(ROOT, "runs", "bench", "grpo_step_model"),
                    help="where the shared random checkpoint is built (once) and read")
    ap.add_argument("--json", default=None, help="also write all results to this JSON file")
    ap.add_argument("--profile", action="store_true",
                    help="also time the phases of each step (wall and CPU s per step; adds a little overhead)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--lockstep", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        fn = {"ours": run_ours, "trl": run_trl}[args.child]
        result = fn(args.ckpt, float(args.kl), args.steps, args.warmup, args.threads, profile=args.profile,
                    lockstep=args.lockstep)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    build_checkpoint(args.ckpt)
    import model as vlm
    n_params = sum(t.numel() for t in vlm.load(args.ckpt).state_dict().values())
    print(f"model: random Qwen3-VL, {n_params / 1e6:.1f}M parameters ({args.ckpt}); 1 prompt x G={GROUP_SIZE}, "
          f"{PROMPT_TOKENS}-token prompt (64 image tokens), {NEW_TOKENS} new tokens, fp32, {args.threads} threads; "
          f"median of {args.steps} steps after {args.warmup} warm-up", flush=True)
    sides = args.sides.split(",")
    results = {}
    for kl in [float(k) for k in args.kl.split(",")]:
        load = os.getloadavg()[0]
        pair = run_sides(sides, args.ckpt, kl, args)
        for side in sides:
            r = results[f"{side} kl={kl:g}"] = pair[side]
            r["load_avg"] = [load, os.getloadavg()[0]]
            print(f"{side:4s} kl={kl:<5g} {1 / r['median_s']:6.3f} steps/s  (median {r['median_s']:.2f} s; steps "
                  f"{', '.join(f'{t:.2f}' for t in r['step_s'])})  CPU {r['median_cpu_s']:.2f} s/step  "
                  f"peak RSS {r['peak_rss_mib']:.0f} MiB (after load {r['rss_loaded_mib']:.0f})  "
                  f"response len {statistics.mean(r['response_len']):.0f}  load avg {load:.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if args.profile:
        print_phases(results, sides, [float(k) for k in args.kl.split(",")])
    if {"ours", "trl"} <= set(sides):
        print("ratios (ours vs TRL; speed > 1 and RSS < 1 mean ours is better):")
        for kl in [float(k) for k in args.kl.split(",")]:
            o, t = results[f"ours kl={kl:g}"], results[f"trl kl={kl:g}"]
            print(f"  kl={kl:<5g} steps/s x{t['median_s'] / o['median_s']:.2f}  "
                  f"CPU s/step x{t['median_cpu_s'] / o['median_cpu_s']:.2f}  "
                  f"peak RSS x{o['peak_rss_mib'] / t['peak_rss_mib']:.2f} "
                  f"({o['peak_rss_mib']:.0f} vs {t['peak_rss_mib']:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
