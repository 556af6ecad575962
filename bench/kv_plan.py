"""Rows in flight under a KV budget at the paper's scale: the rollout engine's own scheduler (rollout/scheduler.py) and
budget split (rollout.engine.paged_plan), driven by simulated prompt and response lengths instead of a model, for the
static reservation (every row holds max_new_tokens from admission) and the paged store (blocks follow the tokens).
CPU, seconds.

    python bench/kv_plan.py                                   # Qwen3-VL-8B, 26 GiB, 256 prompts x 8, responses <= 4096
    python bench/kv_plan.py --budget_gb 40 --model qwen3-vl-4b --mean 1500

The simulation follows Engine.generate move for move: admit what fits, pack live groups into the lowest slots when
nothing waits, give rows the blocks their next steps need (a full store preempts the newest group, which restarts),
run the steps, look which rows stopped (a row of final length L stops after L - 1 decode steps). Reported per store:
rows in flight (unfinished rows per decode step, on average), rows computed per step (whole groups, up to the highest
live slot), decode steps, preemptions, and the tokens recomputed after them. The last line is the ratio of rows in
flight, paged / static.
"""
import argparse
import math
import os
import random
import sys

if __name__ == "__main__":  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from rollout.engine import BLOCK_SIZE, paged_plan
from rollout.scheduler import Scheduler, blocks_for
from runtime.memory_plan import load_model_config


def lengths(args) -> tuple[list[int], list[int]]:
    """Prompt lengths uniform in [prompt_min, prompt_max]; response lengths lognormal with the given mean and sigma,
    at least 1, cut at max_new_tokens (a cut row runs to the limit)."""
    rng = random.Random(args.seed)
    prompts = [rng.randint(args.prompt_min, args.prompt_max) for _ in range(args.prompts)]
    mu = math.log(args.mean) - args.sigma ** 2 / 2  # E[lognormal] = exp(mu + sigma^2 / 2)
    responses = [max(1, min(args.max_new_tokens, round(rng.lognormvariate(mu, args.sigma))))
                 for _ in range(args.prompts * args.group_size)]
    return prompts, responses


def simulate(blocks: int, slots: int, per_prefill: int, prompts: list[int], responses: list[int], G: int, N: int,
             check_every: int, reserve_full: bool) -> dict:
    sched = Scheduler(blocks, BLOCK_SIZE, G, N, slots, prompts, reserve_full=reserve_full)
    steps = live_row_steps = row_steps = recomputed = 0
    while sched.waiting or sched.live:
        while sched.admit(check_every, limit=per_prefill):
            pass
        sched.compact()
        n = min(check_every, min(N - 1 - g.steps for g in sched.live.values()))
        preempted, _ = sched.grow(n)
        recomputed += sum(min(g.steps + 1, responses[g.prompt * G + j]) for g in preempted for j in range(G))
        rows, live = G * sched.groups_in_step(), sched.live_rows()
        sched.stepped(n)
        steps, row_steps, live_row_steps = steps + n, row_steps + n * rows, live_row_steps + n * live
        done = {s: [g.steps + 1 >= responses[g.prompt * G + j] for j in range(G)] for s, g in sched.live.items()}
        sizes = {s: [min(g.steps + 1, responses[g.prompt * G + j]) for j in range(G)] for s, g in sched.live.items()}
        sched.looked(done, sizes)
    return {"steps": steps, "rows_in_flight": live_row_steps / steps, "rows_computed": row_steps / steps,
            "preemptions": sched.preemptions, "recomputed_tokens": recomputed}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen3-vl-8b", help="a preset (qwen3-vl-2b/4b/8b) or a checkpoint dir")
    ap.add_argument("--budget_gb", type=float, default=26.0, help="KV budget per GPU (the engine's --rollout_kv_gb)")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--group_size", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=4096)
    ap.add_argument("--prompt_min", type=int, default=600)
    ap.add_argument("--prompt_max", type=int, default=2000)
    ap.add_argument("--mean", type=float, default=900.0, help="mean response length (lognormal)")
    ap.add_argument("--sigma", type=float, default=0.8, help="lognormal sigma of response lengths")
    ap.add_argument("--check_every", type=int, default=8, help="decode steps between the engine's looks")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    cfg = load_model_config(args.model).text
    G, N = args.group_size, args.max_new_tokens
    prompts, responses = lengths(args)
    budget = int(args.budget_gb * 2 ** 30)
    blocks, per_prefill, slots = paged_plan(cfg, budget, prompts, G, torch.bfloat16, torch.bfloat16, args.prompt_max)
    per_token = cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2 * 2
    # the static reservation as the engine had it: group slots of the longest prompt and G x max_new_tokens, each with
    # its share of the prefill's cache, as many as the whole budget holds
    static_slots = budget // (per_token * (2 * args.prompt_max + G * N))
    static_group = blocks_for(args.prompt_max, BLOCK_SIZE) + G * blocks_for(N, BLOCK_SIZE)
    results = {"static": simulate(1 + static_slots * static_group, static_slots, per_prefill, prompts, responses,
                                  G, N, args.check_every, reserve_full=True),
               "paged": simulate(blocks, slots, per_prefill, prompts, responses, G, N, args.check_every,
                                 reserve_full=False)}
    mean_len = sum(responses) / len(responses)
    cut = sum(r == N for r in responses) / len(responses)
    print(f"{args.model}: KV {per_token // 1024} KiB/token (bf16), budget {args.budget_gb:g} GiB = {blocks - 1} "
          f"blocks of {BLOCK_SIZE} tokens after an eighth for the prefill; {args.prompts} prompts of "
          f"{args.prompt_min}-{args.prompt_max} tokens x G={G}; responses lognormal, mean {mean_len:.0f} tokens "
          f"(sigma {args.sigma}), {100 * cut:.1f}% cut at {N}")
    print("| store | rows in flight | rows computed per step | decode steps | preemptions | tokens recomputed |")
    print("|---|---|---|---|---|---|")
    total = sum(responses)
    for name, r in results.items():
        print(f"| {name} | {r['rows_in_flight']:.1f} | {r['rows_computed']:.1f} | {r['steps']:,} | "
              f"{r['preemptions']} | {r['recomputed_tokens']:,} ({100 * r['recomputed_tokens'] / total:.1f}%) |")
    ratio = results["paged"]["rows_in_flight"] / results["static"]["rows_in_flight"]
    print(f"rows in flight, paged / static: {ratio:.2f}x")
    return results


if __name__ == "__main__":
    main()
