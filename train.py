"""SafeGRPO training: rollouts -> rule rewards -> group advantages -> clipped policy loss with KL.

    python train.py                        # the built-in toy world, end to end on CPU in minutes
    torchrun --nproc_per_node=8 train.py --model=/ckpt/Qwen3-VL-8B-Thinking --data=/data/safetag.parquet
Options: `python train.py --help` (every field of config.Config).
"""
import math
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

import grpo
import rewards
import trainstate
from engine import Engine, hash64, left_pad
from config import Config, help_text, parse_config
from model.prefix import GroupedForward, grouped_logits
from parallel import (RolloutPolicy, all_gather_objects, all_reduce_sum, barrier, build_policy, build_reference,  # noqa: F401
                      check_finite, decoder_blocks, full_states, init_distributed, load_optimizer_state)
from trainlog import MetricsLog, plot_curves


# ----------------------------------------------------------------------------- data

def load_split(cfg: Config, split: str):
    """Records of one split: the toy world, or a SafeTag-format dataset on disk."""
    if cfg.data == "toy":
        from data import toy
        n = cfg.toy_train_size if split == cfg.train_split else cfg.toy_eval_size
        return toy.records(split, n, cfg.seed)
    from data.safetag import load_safetag
    return load_safetag(cfg.data, split=split, image_root=cfg.image_root or None)


def encode_records(processor, records, cfg: Config) -> list[dict]:
    """Chat-render and tokenize each record once; a prompt over max_prompt_len is an error, never cut."""
    from data.prompt import build_prompt
    encoded = []
    for rec in records:
        text = build_prompt(rec.prompt, cfg.prompt_file or None) if cfg.step_guided else rec.prompt
        enc = processor.encode(text, rec.images)
        if enc["input_ids"].numel() > cfg.max_prompt_len:
            raise ValueError(f"record {rec.id}: prompt is {enc['input_ids'].numel()} tokens, "
                             f"over --max_prompt_len={cfg.max_prompt_len}")
        encoded.append(enc)
    return encoded


def step_prompt_ids(step: int, n_records: int, cfg: Config) -> list[int]:
    """The global prompt indices of a step: epoch-wise seeded permutations, read as one stream.

    Depends only on (seed, step), so every rank, and a resumed run, sees the same order."""
    ids = []
    for k in range(step * cfg.prompts_per_step, (step + 1) * cfg.prompts_per_step):
        epoch, pos = divmod(k, n_records)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        ids.append(int(torch.randperm(n_records, generator=g)[pos]))
    return ids


# ----------------------------------------------------------------------------- batches and log-probs

def collate(prompts: list[dict], response_ids: torch.Tensor, response_mask: torch.Tensor, pad_id: int, device,
            rope_index, image_token_id: int):
    """[left-padded prompt | right-padded response] rows; the response occupies the last R columns.

    prompts[i] is row i's Processor.encode output; response_* are (b, R). Positions and image slots come
    from the prompt alone and response positions continue as text, exactly as the sampler decoded them:
    a sampled <|image_pad|> id in a response is text, not a request for image features."""
    b, R = response_ids.shape
    prompt_ids, prompt_mask, pix, grid = left_pad(prompts, pad_id, "cpu")  # (b, P), the sampler's own padding
    input_ids = torch.cat([prompt_ids, torch.where(response_mask.bool(), response_ids,
                                                   torch.full_like(response_ids, pad_id))], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask.long()], dim=1)
    prompt_real = prompt_mask.bool()
    prompt_pos, _ = rope_index(prompt_ids, grid, prompt_real)  # (3, b, P)
    next_pos = prompt_pos.masked_fill(~prompt_real[None], -1).amax(dim=(0, 2)) + 1  # (b,)
    response_pos = (next_pos[:, None] + torch.arange(R))[None].expand(3, b, R)
    image_mask = torch.cat([(prompt_ids == image_token_id) & prompt_real, torch.zeros((b, R), dtype=torch.bool)],
                           dim=1)
    return dict(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                position_ids=torch.cat([prompt_pos, response_pos], dim=2).to(device),
                image_mask=image_mask.to(device), pixel_values=None if pix is None else pix.to(device),
                image_grid_thw=None if grid is None else grid.to(device))


def response_logprobs(model, batch: dict, response_ids: torch.Tensor, temperature: float):
    """Log-probs of the response tokens under `model` (b, R), and the logits they came from."""
    R = response_ids.shape[1]
    # logits at column t predict token t+1: the R response tokens are predicted by the R columns before them
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                   pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                   image_mask=batch["image_mask"], logits_to_keep=R + 1)[:, :-1]
    return grpo.token_logprobs(logits, response_ids, temperature=temperature), logits


def autocast_ctx(cfg: Config, device):
    if device.type == "cuda" and cfg.dtype in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and cfg.dtype == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


# ----------------------------------------------------------------------------- rollouts and evaluation

def rollout(engine: Engine, processor, prompts, labels, cfg: Config, step: int, prompt_ids: list[int], reward_fn,
            device):
    """G samples per prompt from the current policy (the engine reads its weights), decoded and scored by the rule
    reward. Under the training forward's autocast, so that sampled log-probs round like the trainer's."""
    seeds = [hash64(cfg.seed, step, pid) for pid in prompt_ids]
    with torch.no_grad(), autocast_ctx(cfg, device):
        ro = engine.generate(prompts, group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                             temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                             stop_token_ids=processor.stop_token_ids, pad_token_id=processor.pad_token_id,
                             prompt_seeds=seeds)
    texts = decode_responses(processor, ro)
    row_labels = [labels[int(i)] for i in ro.prompt_index]
    scored = [reward_fn(t, lab) for t, lab in zip(texts, row_labels)]
    rewards_t = torch.tensor([s[0] for s in scored], dtype=torch.float32)
    if not torch.isfinite(rewards_t).all():
        bad = [i for i, s in enumerate(scored) if not math.isfinite(s[0])]
        raise ValueError(f"reward function --reward={cfg.reward} returned non-finite rewards for rows {bad[:10]}")
    return ro, texts, rewards_t, [s[1] for s in scored]


def decode_responses(processor, ro) -> list[str]:
    """Response text as the reward reads it: the stop token (<|im_end|>) is special and dropped, so that
    `</answer>` ends the text as the format gate requires (PAPER.md section 3)."""
    return [processor.decode(ro.response_ids[r][ro.response_mask[r].bool()].tolist(), skip_special_tokens=True)
            for r in range(ro.response_ids.shape[0])]


def evaluate(engine: Engine, processor, records, cfg: Config, device, reward_fn, rank: int, world: int) -> dict:
    """Greedy decoding on held-out records (sharded over ranks), scored with the safety metrics."""
    from data.toy import metrics as safety_metrics
    mine = list(range(rank, len(records), world))
    responses = {}
    for start in range(0, len(mine), cfg.eval_batch_size):
        idx = mine[start:start + cfg.eval_batch_size]
        prompts = encode_records(processor, [records[i] for i in idx], cfg)
        with torch.no_grad(), autocast_ctx(cfg, device):
            ro = engine.generate(prompts, group_size=1, max_new_tokens=cfg.max_new_tokens, temperature=0.0,
                                 stop_token_ids=processor.stop_token_ids, pad_token_id=processor.pad_token_id, seed=0)
        responses.update(zip(idx, decode_responses(processor, ro)))
    merged = {}
    for part in all_gather_objects(responses):
        merged.update(part)
    ordered = [merged[i] for i in range(len(records))]
    return safety_metrics(records, ordered, reward_fn=reward_fn)


# ----------------------------------------------------------------------------- one GRPO step

def train_on_rollouts(policy, ref_model, optimizer, scheduler, prompts, ro, advantages, cfg: Config, device,
                      world: int, pad_id: int) -> dict:
    """mu epochs over mini-batches of the step's rollouts; one optimizer update per mini-batch.

    Rows are ordered by prompt (row r is prompt r // G). A mini-batch is mini_batch_prompts/world prompts'
    G rows on this rank, split into micro-batches for gradient accumulation. The loss normalizer is the
    mini-batch's total over ALL ranks (response tokens for token-mean, sequences for the seq modes), so
    summing micro-batch gradients over ranks gives exactly the full-batch gradient."""
    B = ro.response_ids.shape[0]
    rows_per_mb = cfg.mini_batch_prompts // world * cfg.group_size
    old_logprobs = ro.logprobs
    if cfg.ppo_epochs > 1:  # mu > 1: recompute the behaviour log-probs with the training forward, once
        old_logprobs = torch.zeros_like(ro.logprobs)
        with torch.no_grad():
            for rows in chunks(list(range(B)), cfg.micro_batch_size):
                old_logprobs[rows] = micro_logprobs(policy, prompts, ro, rows, cfg, device, pad_id)[0].float().cpu()
    sums, extremes, updates, skipped = {}, {}, 0, 0
    for _ in range(cfg.ppo_epochs):
        for mb in chunks(list(range(B)), rows_per_mb):
            # the global normalizer: response tokens (token-mean) or non-empty sequences (seq modes) of the
            # whole mini-batch over all ranks, so micro-batch and rank shares add up to the full-batch loss
            normalizer = all_reduce_sum([float(grpo.agg_normalizer(ro.response_mask[mb], cfg.loss_agg))], device)[0]
            micro = list(chunks(mb, cfg.micro_batch_size))
            for j, rows in enumerate(micro):
                sync = j == len(micro) - 1 or not hasattr(policy, "no_sync")
                with (nullcontext() if sync else policy.no_sync()):
                    logp, logits, resp, mask = micro_logprobs(policy, prompts, ro, rows, cfg, device, pad_id)
                    ref_lp = None
                    if ref_model is not None and cfg.kl_coef > 0:
                        with torch.no_grad():
                            ref_lp = micro_logprobs(ref_model, prompts, ro, rows, cfg, device, pad_id)[0]
                    loss, stats = grpo.policy_loss(
                        logp, old_logprobs[rows].to(device)[:, :mask.shape[1]],
                        advantages[rows].to(device), mask, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                        dual_clip=cfg.dual_clip or None, ref_logprobs=ref_lp, kl_coef=cfg.kl_coef,
                        kl_kind=cfg.kl_kind, agg=cfg.loss_agg, loss_normalizer=normalizer,
                        norm_constant=cfg.max_new_tokens, logits=logits, entropy_coef=cfg.entropy_coef)
                    # DDP/FSDP average gradients over ranks; the normalizer is already global, so undo the mean
                    (loss * world).backward()
                weight = float(mask.sum())
                for k, v in stats.items():
                    if k in SHARE_STATS:  # shares of the mini-batch value: they add up over micro-batches/ranks
                        sums[k] = sums.get(k, 0.0) + float(v)
                    elif k == "ratio_min":
                        extremes[k] = min(extremes.get(k, math.inf), float(v))
                    elif k == "ratio_max":
                        extremes[k] = max(extremes.get(k, -math.inf), float(v))
                    else:  # per-token means of this micro-batch: weight by its token count
                        sums[k] = sums.get(k, 0.0) + float(v) * weight
                sums["_w"] = sums.get("_w", 0.0) + weight
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            if math.isfinite(grad_norm):
                optimizer.step()
                updates += 1
            else:  # a non-finite gradient poisons AdamW's moments: drop this update entirely
                skipped += 1
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + (grad_norm if math.isfinite(grad_norm) else 0.0)
    n_mb = max(1, updates + skipped)
    w = all_reduce_sum([sums.pop("_w", 0.0)], device)[0] or 1.0
    grad_norm_sum = sums.pop("grad_norm", 0.0)
    keys = sorted(sums)
    totals = all_reduce_sum([sums[k] for k in keys], device)
    out = {k: v / (n_mb if k in SHARE_STATS else w) for k, v in zip(keys, totals)}
    out.update(extremes)  # this rank's ratio extremes
    out["grad_norm"] = grad_norm_sum / n_mb
    out["skipped_updates"], out["updates"] = skipped, updates
    return out


SHARE_STATS = ("loss", "pg_loss", "kl")  # grpo.policy_loss returns these as shares of the mini-batch value


def chunks(xs: list, n: int):
    for i in range(0, len(xs), n):
        yield xs[i:i + n]


def micro_logprobs(model, prompts, ro, rows: list[int], cfg: Config, device, pad_id: int):
    """Training-forward log-probs for some rollout rows, trimmed to their longest response.

    With cfg.shared_prefix the rows' distinct prompts run once and their rows attend to them (model/prefix.py);
    otherwise every row is [its prompt | its response] (the prompt recomputed G times)."""
    mask = ro.response_mask[rows]
    R = max(1, int(mask.sum(1).max()))
    resp = ro.response_ids[rows][:, :R]
    mask = mask[:, :R]
    if cfg.shared_prefix:
        batch = collate_groups(prompts, ro.prompt_index[rows], resp, mask, pad_id, device)
        with autocast_ctx(cfg, device):
            if isinstance(getattr(model, "module", None), GroupedForward):  # DDP around GroupedForward
                logits, anchor = model(**batch)
            else:
                logits, anchor = grouped_logits(model, **batch)
            logp = grpo.token_logprobs(logits, resp.to(device), temperature=cfg.temperature) + anchor
        return logp, logits, resp.to(device), mask.to(device).float()
    net = getattr(model, "module", model)  # DDP keeps the model in .module
    batch = collate([prompts[int(ro.prompt_index[r])] for r in rows], resp, mask, pad_id, device,
                    net.rope_index, net.config.image_token_id)
    with autocast_ctx(cfg, device):
        logp, logits = response_logprobs(model, batch, resp.to(device), cfg.temperature)
    return logp, logits, resp.to(device), mask.to(device).float()


def collate_groups(prompts: list[dict], prompt_index: torch.Tensor, response_ids, response_mask, pad_id: int,
                   device) -> dict:
    """grouped_logits' inputs: the distinct prompts of these rows (left-padded, in first-seen order), their
    images, and each row's prompt number."""
    order = list(dict.fromkeys(int(i) for i in prompt_index))
    local = {p: u for u, p in enumerate(order)}
    ids, real, pix, grid = left_pad([prompts[p] for p in order], pad_id, device)
    return dict(prompt_ids=ids, prompt_mask=real, pixel_values=pix, image_grid_thw=grid,
                response_ids=response_ids.to(device), response_mask=response_mask.to(device),
                row_prompt=torch.tensor([local[int(i)] for i in prompt_index], device=device))


def rollout_kv_budget(cfg: Config, net, device) -> int | None:
    """--rollout_kv_gb in bytes; 0 = on CUDA a third of the memory that is free now less what the optimizer will
    take at its first step (fp32 gradients and AdamW's two moments), on CPU no limit."""
    if cfg.rollout_kv_gb > 0:
        return int(cfg.rollout_kv_gb * 2 ** 30)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    params = sum(p.numel() for p in net.parameters() if p.requires_grad)  # this rank's shard under FSDP2
    return max(int((free - 12 * params) / 3), 1 << 30)


def make_optimizer(net, cfg: Config):
    """AdamW; the fused kernel (3x faster step on CPU here) except on FSDP2's sharded DTensor parameters."""
    sharded = cfg.fsdp and dist.is_initialized()
    return torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=not sharded)


def make_scheduler(optimizer, cfg: Config, total_updates: int):
    def factor(update: int) -> float:
        if cfg.warmup_steps and update < cfg.warmup_steps:
            return (update + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "cosine":
            progress = (update - cfg.warmup_steps) / max(1, total_updates - cfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------- toy world

def prepare_toy(cfg: Config, rank: int, device) -> str:
    """Build the toy checkpoint and run the supervised warm start once; returns the warm-started dir."""
    import model as vlm
    from data import toy
    from data.warmstart import warm_start
    init_dir = os.path.join(cfg.out_dir, "toy_init")
    ws_dir = os.path.join(cfg.out_dir, "warmstart")
    if rank == 0 and not os.path.isfile(os.path.join(ws_dir, "config.json")):
        if not os.path.isfile(os.path.join(init_dir, "config.json")):
            toy.build_checkpoint(init_dir, seed=cfg.seed)
        net = vlm.load(init_dir, device=device, dtype=torch.float32)
        processor = vlm.load_processor(init_dir)
        import random
        rng = random.Random(cfg.seed)
        examples = [(r, toy.warmstart_response(r, rng)) for r in toy.records(cfg.train_split, cfg.toy_train_size, cfg.seed)]
        t0 = time.time()
        warm_start(net, processor, examples, steps=cfg.warmstart_steps, lr=cfg.warmstart_lr,
                   batch_size=cfg.warmstart_batch_size, seed=cfg.seed)
        print(f"warm start: {cfg.warmstart_steps} steps in {time.time() - t0:.0f}s", flush=True)
        tmp = ws_dir + ".tmp"
        vlm.save(net, tmp)
        processor.save(tmp)
        os.replace(tmp, ws_dir)
    barrier()
    return ws_dir


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(help_text())
        return {}
    cfg = parse_config(argv)
    rank, world, device = init_distributed(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.prompts_per_step % world or cfg.mini_batch_prompts % world:
        raise ValueError(f"prompts_per_step={cfg.prompts_per_step} and mini_batch_prompts={cfg.mini_batch_prompts} "
                         f"must be divisible by the number of processes ({world})")
    torch.manual_seed(cfg.seed)
    log = print if rank == 0 else (lambda *a, **k: None)
    log(f"config:\n{cfg.to_json()}", flush=True)
    os.makedirs(cfg.out_dir, exist_ok=True)
    if rank == 0:
        trainstate.write_json(os.path.join(cfg.out_dir, "config.json"), __import__("json").loads(cfg.to_json()))

    import model as vlm
    reward_fn = rewards.resolve_reward(cfg.reward)
    init_path = prepare_toy(cfg, rank, device) if cfg.model == "toy" else cfg.model
    processor = vlm.load_processor(init_path)
    train_records, eval_records = load_split(cfg, cfg.train_split), load_split(cfg, cfg.eval_split)
    if cfg.eval_size:
        eval_records = eval_records[:cfg.eval_size]
    if not train_records:
        raise ValueError(f"--data={cfg.data}: split {cfg.train_split!r} has no rows")
    steps_per_epoch = math.ceil(len(train_records) / cfg.prompts_per_step)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    updates_per_step = cfg.ppo_epochs * cfg.prompts_per_step // cfg.mini_batch_prompts

    resume = trainstate.latest_checkpoint(cfg.out_dir) if cfg.resume else None
    policy_path = os.path.join(resume, "policy") if resume else init_path
    wrapped, net = build_policy(policy_path, cfg, device, world)
    ref_model = build_reference(init_path, cfg, device) if cfg.kl_coef > 0 else None
    optimizer = make_optimizer(net, cfg)
    scheduler = make_scheduler(optimizer, cfg, total_steps * updates_per_step)
    start_step, nonfinite, summary = 0, 0, {}
    if resume:
        # under FSDP only rank 0 reads the optimizer tensors (a full fp32 AdamW state per rank would not fit)
        ck = trainstate.load_checkpoint(resume, optimizer=rank == 0 or not (cfg.fsdp and dist.is_initialized()))
        load_optimizer_state(wrapped, optimizer, ck["optimizer"], cfg)
        scheduler.load_state_dict(ck["trainer_state"]["scheduler"])
        start_step, nonfinite = ck["trainer_state"]["step"], ck["trainer_state"]["nonfinite"]
        summary = ck["trainer_state"].get("summary", {})
        log(f"resumed from {resume} at step {start_step}", flush=True)
    metrics_log = MetricsLog(cfg.out_dir, rank == 0, cfg.wandb, cfg.wandb_project,
                             __import__("json").loads(cfg.to_json()), resume_step=start_step)
    labels = [r.labels for r in train_records]

    # Two engines, each keeping its buffers and CUDA graphs across steps: G-sample rollouts, and greedy evaluation.
    kv_budget = rollout_kv_budget(cfg, net, device)
    rollout_engine, eval_engine = Engine(net, kv_budget_bytes=kv_budget), Engine(net, kv_budget_bytes=kv_budget)

    def run_eval(tag: str, records) -> dict:
        with RolloutPolicy(wrapped, net, cfg.fsdp and dist.is_initialized()):
            m = evaluate(eval_engine, processor, records, cfg, device, reward_fn, rank, world)
        log(f"eval[{tag}] " + " ".join(f"{k}={v:.3f}" for k, v in m.items() if isinstance(v, float)), flush=True)
        return m

    if "before" not in summary and eval_records:
        summary["before"] = run_eval("before", eval_records)

    def checkpoint(step: int):
        check_finite(net)
        save_policy, optim_state = full_states(wrapped, net, optimizer, cfg)  # every rank: FSDP gathers
        if rank == 0:
            trainstate.save_checkpoint(cfg.out_dir, step, save_policy, optim_state,
                                       {"step": step, "nonfinite": nonfinite, "scheduler": scheduler.state_dict(),
                                        "cursor": step * cfg.prompts_per_step, "summary": summary,
                                        "config": __import__("json").loads(cfg.to_json())},
                                       keep_last=cfg.keep_last)
        barrier()

    try:
        from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=start_step, disable=rank != 0, desc="SafeGRPO", file=sys.stderr)
    except ImportError:
        bar = None
    net.train()
    for step in range(start_step, total_steps):
        t0 = time.time()
        ids = step_prompt_ids(step, len(train_records), cfg)[rank::world]   # this rank's prompts
        prompts = encode_records(processor, [train_records[i] for i in ids], cfg)
        with RolloutPolicy(wrapped, net, cfg.fsdp and dist.is_initialized()):
            ro, texts, rew, comps = rollout(rollout_engine, processor, prompts, [labels[i] for i in ids], cfg, step,
                                            ids, reward_fn, device)
        t_rollout = time.time() - t0
        advantages = grpo.group_advantages(rew, cfg.group_size, scale=cfg.adv_scale)
        stats = train_on_rollouts(wrapped, ref_model, optimizer, scheduler, prompts, ro, advantages, cfg,
                                  device, world, processor.pad_token_id)
        n_gen = float(ro.response_mask.sum())
        keys = ("format", "tag", "behavior", "visual_correct", "text_correct", "combined_correct", "refused")
        local = [float(rew.sum()), float(len(rew)), n_gen] + [float(sum(float(c.get(k, 0)) for c in comps)) for k in keys]
        # refusals split by the reference verdict: rising over_refusal means the policy learns "refuse" blindly
        unsafe = [labels[ids[int(i)]].get("combine_tag") == "unsafe" for i in ro.prompt_index]
        refused = [bool(c.get("refused")) for c in comps]
        local += [float(sum(unsafe)), float(sum(r and u for r, u in zip(refused, unsafe))),
                  float(sum(r and not u for r, u in zip(refused, unsafe)))]
        tot = all_reduce_sum(local, device)
        n_unsafe, n_safe = tot[-3], tot[1] - tot[-3]
        m = {"reward": tot[0] / tot[1], "response_len": tot[2] / tot[1],
             **{k: v / tot[1] for k, v in zip(keys, tot[3:3 + len(keys)])},
             "refusal_unsafe": tot[-2] / n_unsafe if n_unsafe else math.nan,     # NaN: no such row this step
             "over_refusal_safe": tot[-1] / n_safe if n_safe else math.nan,
             "kl": stats.get("kl", 0.0), "clipfrac": stats.get("clipfrac_low", 0.0) + stats.get("clipfrac_high", 0.0),
             "entropy": stats.get("entropy", 0.0), "pg_loss": stats.get("pg_loss", 0.0),
             "ratio_max": stats.get("ratio_max", 0.0), "grad_norm": stats["grad_norm"],
             "lr": scheduler.get_last_lr()[0], "tokens_per_s": tot[2] / max(t_rollout, 1e-9),
             "rollout_time": t_rollout, "step_time": time.time() - t0, "skipped": stats["skipped_updates"]}
        if stats["skipped_updates"]:
            nonfinite += stats["skipped_updates"]
            log(f"step {step + 1}: skipped {stats['skipped_updates']} update(s) with non-finite gradients "
                f"({nonfinite} so far, limit {cfg.max_nonfinite})", flush=True)
        metrics_log.log(step + 1, m)
        log(metrics_log.console(step + 1, total_steps, m), flush=True)
        if bar is not None:
            bar.update(1)
        if nonfinite > cfg.max_nonfinite:
            raise RuntimeError(f"stopping: {nonfinite} non-finite updates exceed --max_nonfinite={cfg.max_nonfinite}; "
                               f"the last good checkpoint is {trainstate.latest_checkpoint(cfg.out_dir)}")
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < total_steps and eval_records:
            metrics_log.log(step + 1, {f"eval_{k}": v for k, v in run_eval(f"step {step + 1}", eval_records).items()
                                       if isinstance(v, float)})
        if cfg.save_every and (step + 1) % cfg.save_every == 0 or step + 1 == total_steps:
            checkpoint(step + 1)
    if bar is not None:
        bar.close()

    if eval_records:
        summary["after"] = run_eval("after", eval_records)
        if cfg.data == "toy":
            from data import toy
            summary["after_image_blank"] = run_eval("after, images blanked", toy.blank_images(eval_records))
    if rank == 0:
        trainstate.write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
        png = plot_curves(metrics_log.read(), os.path.join(cfg.out_dir, "curves.png"))
        log(f"wrote {os.path.join(cfg.out_dir, 'summary.json')}" + (f" and {png}" if png else ""), flush=True)
    barrier()
    if world > 1 and dist.is_initialized():
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
