"""SafeGRPO training: rollouts -> rule rewards -> group advantages -> clipped policy loss with KL to a reference.

    python train.py                        # the built-in toy world, end to end on CPU in minutes
    torchrun --nproc_per_node=8 train.py --model=/ckpt/Qwen3-VL-8B-Thinking --data=/data/safetag.parquet
Options: `python train.py --help` (config.py). The method: docs/method.md. The trained model: <out_dir>/final/.
"""
import math
import os
import sys
import time
from contextlib import nullcontext

import torch

import grpo
from runtime import memory_plan
import rewards
import safety_metrics
from runtime import checkpoints
from config import Config, frees_rollout_memory, help_text, parse_config
from data.stream import drop_overlong, encode, epoch_length, load_split, prompt_lengths, stream_ids
from data.warmstart import prepare_toy_model
from rollout.randomness import hash64
from rollout.engine import Engine, Rollout
from logprobs import all_logprobs, micro_batches, micro_logprobs, padded_positions
from runtime.parallel import (all_gather_objects, all_reduce_sum, autocast_ctx, barrier, build_policy, build_reference,
                              check_finite, full_states, init_distributed, load_optimizer_state, rollout_kv_budget,
                              shutdown, uses_fsdp)
from runtime.files import write_json
from runtime.logs import MetricsLog, StatSums, plot_curves


# ----------------------------------------------------------------------------- rollouts

def decode_responses(processor, ro: Rollout) -> list[str]:
    """Response text as the reward reads it: the stop token (<|im_end|>) is special and dropped, so that </answer>
    ends the text as the format rule wants."""
    return [processor.decode(ro.response_ids[r][ro.response_mask[r].bool()].tolist(), skip_special_tokens=True)
            for r in range(ro.response_ids.shape[0])]


def rollout(engine: Engine, processor, records, ids: list[int], cfg: Config, step: int, reward_fn, device) -> dict:
    """G samples for each record id from the current policy (the engine reads its weights), decoded and scored by
    the rule reward (+ DAPO's overlong penalty). Under the training forward's autocast, so that sampled log-probs
    round like the trainer's."""
    prompts = [encode(processor, records[i], cfg) for i in ids]
    with torch.no_grad(), autocast_ctx(cfg, device):
        ro = engine.generate(prompts, group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                             temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                             stop_token_ids=processor.stop_token_ids, pad_token_id=processor.pad_token_id,
                             prompt_seeds=[hash64(cfg.seed, step, i) for i in ids])
    texts = decode_responses(processor, ro)
    labels = [records[ids[int(i)]].labels for i in ro.prompt_index]
    loopholes = [rewards.loophole(t, lab) for t, lab in zip(texts, labels)]
    scored = [reward_fn(t, lab) for t, lab in zip(texts, labels)]
    reward = torch.tensor([s[0] for s in scored], dtype=torch.float32)
    if not torch.isfinite(reward).all():
        raise ValueError(f"reward function --reward={cfg.reward} returned non-finite rewards for rows "
                         f"{torch.nonzero(~torch.isfinite(reward)).flatten().tolist()[:10]}")
    if cfg.overlong_buffer:
        reward += grpo.overlong_penalty(ro.response_mask.sum(1), cfg.max_new_tokens, cfg.overlong_buffer,
                                        cfg.overlong_penalty)
    comps = [s[1] | {"loophole": cause} for s, cause in zip(scored, loopholes)]
    return dict(ids=ids, prompts=prompts, ro=ro, reward=reward, comps=comps, labels=labels)


ENGINE_STATS = ("capture_s", "preemptions", "rows_in_flight")  # a step's rollout engine metrics (summed over draws)


def engine_stats(ro: Rollout) -> dict:
    return {k: float(ro.stats.get(k, 0.0)) for k in ENGINE_STATS}


def split_groups(batch: dict, G: int) -> list[dict]:
    """A rollout batch as one small dict per prompt (CPU tensors; no images), to gather across ranks."""
    ro, rows = batch["ro"], [slice(g * G, (g + 1) * G) for g in range(len(batch["ids"]))]
    return [dict(id=i, response_ids=ro.response_ids[r], response_mask=ro.response_mask[r], logprobs=ro.logprobs[r],
                 finish=ro.finish_reason[r], reward=batch["reward"][r], comps=batch["comps"][r],
                 labels=batch["labels"][r]) for i, r in zip(batch["ids"], rows)]


def join_groups(groups: list[dict], processor, records, cfg: Config, pad_id: int) -> dict:
    """split_groups' inverse for any list of groups (responses right-padded to the longest)."""
    R = max(g["response_ids"].shape[1] for g in groups)
    pad = lambda t, v: torch.nn.functional.pad(t, (0, R - t.shape[1]), value=v)  # noqa: E731
    ro = Rollout(prompt_index=torch.arange(len(groups)).repeat_interleave(cfg.group_size),
                 response_ids=torch.cat([pad(g["response_ids"], pad_id) for g in groups]),
                 response_mask=torch.cat([pad(g["response_mask"], 0) for g in groups]),
                 logprobs=torch.cat([pad(g["logprobs"], 0) for g in groups]),
                 finish_reason=[f for g in groups for f in g["finish"]])
    return dict(ids=[g["id"] for g in groups], prompts=[encode(processor, records[g["id"]], cfg) for g in groups],
                ro=ro, reward=torch.cat([g["reward"] for g in groups]),
                comps=[c for g in groups for c in g["comps"]], labels=[lab for g in groups for lab in g["labels"]])


def collect_step(engine, processor, records, cfg: Config, step: int, cursor: int, reward_fn, device, rank, world):
    """This rank's rollouts for the step, and the stream position after them. With dynamic sampling (DAPO) groups
    whose rewards are all equal teach nothing: draws of prompts_per_step prompts continue (at most max_draws) until
    the step holds prompts_per_step informative groups, chosen over all ranks in stream order, so that the batch is
    the same for any number of processes; a step still short after max_draws is filled with uninformative groups
    (advantage 0), keeping every rank's batch the same size."""
    P, G = cfg.prompts_per_step, cfg.group_size
    if not cfg.dynamic_sampling:
        ids = stream_ids(cursor, P, len(records), cfg)[rank::world]
        batch = rollout(engine, processor, records, ids, cfg, step, reward_fn, device)
        return batch | {"engine": engine_stats(batch["ro"])}, cursor + P, 1
    informative, others, stats = [], [], {}
    for draw in range(1, cfg.max_draws + 1):
        ids = stream_ids(cursor, P, len(records), cfg)
        cursor += P
        drawn = rollout(engine, processor, records, ids[rank::world], cfg, step * 1000 + draw, reward_fn, device)
        stats = {k: stats.get(k, 0.0) + v for k, v in engine_stats(drawn["ro"]).items()}
        mine = split_groups(drawn, G)
        parts = all_gather_objects(mine)  # rank r holds stream positions r, r + world, ...
        for g in [parts[k % world][k // world] for k in range(P)]:
            (informative if bool(grpo.informative_groups(g["reward"], G)[0]) else others).append(g)
        if len(informative) >= P:
            break
    chosen = (informative + others)[:P]
    stats["rows_in_flight"] /= draw
    return join_groups(chosen[rank::world], processor, records, cfg, processor.pad_token_id) | {"engine": stats}, \
        cursor, draw


def evaluate(engine: Engine, processor, records, cfg: Config, device, reward_fn, rank: int, world: int) -> dict:
    """Greedy decoding on held-out records (sharded over ranks), scored with the safety metrics."""
    mine, responses = list(range(rank, len(records), world)), {}
    for start in range(0, len(mine), cfg.eval_batch_size):
        idx = mine[start:start + cfg.eval_batch_size]
        with torch.no_grad(), autocast_ctx(cfg, device):
            ro = engine.generate([encode(processor, records[i], cfg) for i in idx], group_size=1,
                                 max_new_tokens=cfg.max_new_tokens, temperature=0.0,
                                 stop_token_ids=processor.stop_token_ids, pad_token_id=processor.pad_token_id)
        responses.update(zip(idx, decode_responses(processor, ro)))
    merged = {}
    for part in all_gather_objects(responses):
        merged.update(part)
    return safety_metrics.evaluate(records, [merged[i] for i in range(len(records))], reward_fn=reward_fn)


# ----------------------------------------------------------------------------- the update

def chunks(xs, n: int):
    xs = list(xs)
    for i in range(0, len(xs), n):
        yield xs[i:i + n]


def train_on_rollouts(policy, ref_model, optimizer, scheduler, batch: dict, advantages, old_logprobs, loss_mask,
                      cfg: Config, device, world: int, pad_id: int) -> dict:
    """mu epochs over mini-batches of the step's rollouts; one optimizer update per mini-batch.

    Rows are ordered by prompt (row r is prompt r // G). A mini-batch is mini_batch_prompts/world prompts' G rows
    on this rank, split into micro-batches for gradient accumulation (a number of rows, or packed by tokens:
    logprobs.micro_batches). The loss normalizer is the mini-batch's total over ALL ranks (grpo.agg_normalizer), so
    micro-batch and rank shares add up to the full-batch loss however the rows are cut. loss_mask: the response
    tokens that count (DAPO's mask_truncated zeroes cut responses). Returns the step's stats."""
    ro, prompts = batch["ro"], batch["prompts"]
    rows_per_mb = cfg.mini_batch_prompts // world * cfg.group_size
    kl_in_loss = ref_model is not None and cfg.kl_coef > 0 and not cfg.kl_in_reward
    has_no_sync = hasattr(policy, "no_sync")
    stats = StatSums(shares=("loss", "pg_loss", "kl"))
    # With the sampler's log-probs as the old ones, the forward before the first update is the recomputation:
    # the sampler/trainer mismatch of the first mini-batch comes for free (sum |delta|, tokens, max).
    mismatch = [0.0, 0.0, 0.0] if old_logprobs is ro.logprobs else None
    positions = [0.0, 0.0]  # response positions computed, real ones among them
    for _ in range(cfg.ppo_epochs):
        for mb in chunks(range(ro.response_ids.shape[0]), rows_per_mb):
            micro = micro_batches(mb, ro, prompts, cfg)
            count = len(micro) if cfg.loss_agg == "token-mean-micro" else \
                float(grpo.agg_normalizer(loss_mask[mb], cfg.loss_agg))
            normalizer = all_reduce_sum([float(count)], device)[0]
            if normalizer == 0:  # no token counts (every response truncated under mask_truncated): no update
                continue
            positions = [a + b for a, b in zip(positions, padded_positions(micro, ro))]
            for j, rows in enumerate(micro):
                sync = j == len(micro) - 1 or not has_no_sync  # DDP: all-reduce gradients once per mini-batch
                with (nullcontext() if sync else policy.no_sync()):
                    logp, entropy, _, mask = micro_logprobs(policy, prompts, ro, rows, cfg, device, pad_id,
                                                           entropy_grad=cfg.entropy_coef != 0)
                    R = mask.shape[1]
                    ref_lp = None
                    if kl_in_loss:
                        with torch.no_grad(), ref_model.active():
                            ref_lp = micro_logprobs(ref_model.model, prompts, ro, rows, cfg, device, pad_id)[0]
                    loss, s = grpo.policy_loss(
                        logp, old_logprobs[rows, :R].to(device), advantages[rows].to(device),
                        loss_mask[rows, :R].to(device), clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                        dual_clip=cfg.dual_clip or None, ref_logprobs=ref_lp, kl_coef=cfg.kl_coef if kl_in_loss else 0,
                        kl_kind=cfg.kl_kind, agg=cfg.loss_agg, loss_normalizer=normalizer,
                        norm_constant=cfg.max_new_tokens, entropy=entropy,
                        entropy_coef=cfg.entropy_coef, ratio_level=cfg.ratio_level,
                        rollout_logprobs=ro.logprobs[rows, :R].to(device) if cfg.tis_cap else None,
                        tis_cap=cfg.tis_cap or None)
                    (loss * world).backward()  # DDP/FSDP average gradients over ranks; the normalizer is global
                stats.add(s, weight=float(mask.sum()))
                if mismatch is not None and not stats.counts:
                    delta = (logp.detach().float() - old_logprobs[rows, :R].to(device)).abs() * mask
                    mismatch = [mismatch[0] + float(delta.sum()), mismatch[1] + float(mask.sum()),
                                max(mismatch[2], float(delta.max()))]
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            if math.isfinite(grad_norm):
                optimizer.step()
                scheduler.step()  # the schedule counts updates that happened
                stats.count("updates", grad_norm=grad_norm)
            else:  # a non-finite gradient would poison AdamW's moments: drop this update entirely
                stats.count("skipped_updates")
            optimizer.zero_grad(set_to_none=True)
    out = stats.reduce(device)
    computed, real = all_reduce_sum(positions, device)
    out["padding"] = 1.0 - real / computed if computed else math.nan  # of the response positions computed
    if mismatch is not None:
        total, tokens = all_reduce_sum(mismatch[:2], device)
        out.update(mismatch=total / max(tokens, 1.0), mismatch_max=mismatch[2])
    return out


def make_scheduler(optimizer, cfg: Config, total_updates: int):
    """Linear warmup, then constant or cosine to 0, counted in optimizer updates."""
    def factor(update: int) -> float:
        if cfg.warmup_steps and update < cfg.warmup_steps:
            return (update + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (update - cfg.warmup_steps) /
                                                     max(1, total_updates - cfg.warmup_steps))))
        return 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def behaviour_logprobs(policy, batch, cfg: Config, device, pad_id: int):
    """The old log-probs of the PPO ratio, and the sampler's mismatch against the training forward. In fp32 the
    sampler's log-probs are the behaviour policy's, exactly; under bf16 the two forwards round differently, so
    they are recomputed (verl's default) when --old_logprobs says so ('auto': whenever the policy runs in bf16),
    or when truncated importance sampling needs both."""
    ro = batch["ro"]
    low_precision = autocast_ctx(cfg, device) is not None or next(policy.parameters()).dtype != torch.float32
    if not (cfg.old_logprobs == "recompute" or cfg.tis_cap or cfg.old_logprobs == "auto" and low_precision):
        return ro.logprobs, {}
    old = all_logprobs(policy, batch["prompts"], ro, cfg, device, pad_id)
    delta = (old - ro.logprobs)[ro.response_mask.bool()].abs()
    n = all_reduce_sum([float(delta.sum()), float(delta.numel())], device)
    return old, {"mismatch": n[0] / max(n[1], 1.0), "mismatch_max": float(delta.max()) if delta.numel() else 0.0}


def grpo_update(policy, ref_model, optimizer, scheduler, kl_ctl, batch: dict, cfg: Config, device, rank: int,
                world: int, pad_id: int) -> dict:
    """A step after its rollouts: the old log-probs of the ratio, KL folded into the rewards when asked (verl's
    use_kl_in_reward, with its fixed or adaptive controller kl_ctl), group advantages (batch scaling over every
    rank's rewards), the loss mask (DAPO drops truncated responses), then train_on_rollouts. Returns its stats."""
    ro = batch["ro"]
    old_logprobs, extra = behaviour_logprobs(policy, batch, cfg, device, pad_id)
    reward = batch["reward"]
    if cfg.kl_in_reward and ref_model is not None:
        with ref_model.active():
            ref = all_logprobs(ref_model.model, batch["prompts"], ro, cfg, device, pad_id)
        reward, batch_kl = grpo.kl_in_reward(reward, old_logprobs, ref, ro.response_mask, kl_ctl.value, cfg.kl_kind)
        extra.update(kl_reward=all_reduce_sum([float(batch_kl) / world], device)[0], kl_coef=kl_ctl.value)
        kl_ctl.update(extra["kl_reward"], n_steps=cfg.prompts_per_step * cfg.group_size)
    everyone = torch.cat(all_gather_objects(reward)) if cfg.adv_scale == "batch" else reward
    adv = grpo.group_advantages(everyone, cfg.group_size, scale=cfg.adv_scale, estimator=cfg.adv_estimator)
    adv = adv.view(world, -1)[rank] if cfg.adv_scale == "batch" else adv
    truncated = torch.tensor([f == "length" for f in ro.finish_reason])
    loss_mask = grpo.mask_truncated(ro.response_mask, truncated) if cfg.mask_truncated else ro.response_mask
    return train_on_rollouts(policy, ref_model, optimizer, scheduler, batch, adv, old_logprobs, loss_mask, cfg,
                             device, world, pad_id) | extra


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(help_text())
        return {}
    cfg = parse_config(argv)
    if cfg.dry_run_memory:
        print(memory_plan.plan_for_config(cfg))
        return {}
    rank, world, device = init_distributed(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.prompts_per_step % world or cfg.mini_batch_prompts % world:
        raise ValueError(f"--prompts_per_step={cfg.prompts_per_step} and --mini_batch_prompts="
                         f"{cfg.mini_batch_prompts} must be divisible by the number of processes ({world})")
    torch.manual_seed(cfg.seed)
    fsdp = uses_fsdp(cfg)
    log = print if rank == 0 else (lambda *a, **k: None)
    log(f"config:\n{cfg.to_json()}", flush=True)
    os.makedirs(cfg.out_dir, exist_ok=True)
    if rank == 0:
        write_json(os.path.join(cfg.out_dir, "config.json"), cfg.to_dict())

    # ---- data: the prompts, overlong ones dropped; the held-out split
    import model as vlm
    reward_fn = rewards.resolve_reward(cfg.reward, cfg.tag_weight, cfg.behavior_weight)
    init_path = prepare_toy_model(cfg, rank, device) if cfg.model == "toy" else cfg.model
    processor = vlm.load_processor(init_path)
    train_records, longest = drop_overlong(processor, load_split(cfg, cfg.train_split), cfg, log)
    eval_records = load_split(cfg, cfg.eval_split)[:cfg.eval_size or None]
    longest = max([longest] + prompt_lengths(processor, eval_records, cfg))  # sizes the rollout state once
    if not train_records:
        raise ValueError(f"--data={cfg.data}: split {cfg.train_split!r} has no rows of at most "
                         f"--max_prompt_len={cfg.max_prompt_len} prompt tokens")
    total_steps = cfg.max_steps or cfg.epochs * (epoch_length(len(train_records), cfg) // cfg.prompts_per_step)
    updates_per_step = cfg.ppo_epochs * cfg.prompts_per_step // cfg.mini_batch_prompts

    # ---- models: the policy (DDP or FSDP2), the frozen reference, AdamW and its schedule; or a resumed run
    resume = checkpoints.latest_checkpoint(cfg.out_dir) if cfg.resume else None
    wrapped, net = build_policy(init_path, cfg, device, world, resume_dir=resume and os.path.join(resume, "policy"))
    ref_model = build_reference(init_path, cfg, device, net)  # None without a KL term
    # fused AdamW: 3x faster on CPU, but not for FSDP2's DTensors; frozen parameters (LoRA's base) get no state
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay, fused=not fsdp)
    scheduler = make_scheduler(optimizer, cfg, total_steps * updates_per_step)
    kl_ctl = grpo.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target \
        else grpo.FixedKLController(cfg.kl_coef)
    start_step, cursor, nonfinite, summary = 0, 0, 0, {}
    if resume:
        # under FSDP only rank 0 reads the optimizer tensors (a full fp32 AdamW state per rank would not fit)
        ck = checkpoints.load_checkpoint(resume, optimizer=rank == 0 or not fsdp)
        load_optimizer_state(wrapped, optimizer, ck["optimizer"], cfg)
        state = ck["trainer_state"]
        scheduler.load_state_dict(state["scheduler"])
        start_step, cursor, nonfinite = state["step"], state["cursor"], state["nonfinite"]
        summary, kl_ctl.value = state.get("summary", {}), state.get("kl_coef", kl_ctl.value)
        log(f"resumed from {resume} at step {start_step}", flush=True)
    metrics_log = MetricsLog(cfg.out_dir, rank == 0, cfg.wandb, cfg.wandb_project, cfg.to_dict(),
                             resume_step=start_step)

    # ---- one rollout engine for G samples and for greedy evaluation: its key/value store, weight copies and CUDA
    # graphs (under FSDP2 a whole copy of the weights, refreshed in place) live through the run, or with
    # --free_rollout_memory through rollouts and evaluations only (given back before each update)
    compile_rollout = cfg.compile_rollout == "true" or cfg.compile_rollout == "auto" and device.type == "cuda"
    free_rollout = frees_rollout_memory(cfg.free_rollout_memory, fsdp)
    engine = Engine(net, kv_budget_bytes=rollout_kv_budget(cfg, net, device), max_prompt_len=longest,
                    compile=compile_rollout)

    def run_eval(tag: str, records) -> dict:
        net.eval()
        m = evaluate(engine, processor, records, cfg, device, reward_fn, rank, world)
        net.train()
        log(f"eval[{tag}] " + " ".join(f"{k}={v:.3f}" for k, v in m.items() if isinstance(v, float)), flush=True)
        return m

    def save(step: int):
        check_finite(net)
        save_policy, optim_state = full_states(wrapped, net, optimizer, cfg, extras_from=init_path)
        if rank == 0:
            checkpoints.save_checkpoint(cfg.out_dir, step, save_policy, optim_state, dict(
                step=step, cursor=cursor, nonfinite=nonfinite, scheduler=scheduler.state_dict(), summary=summary,
                kl_coef=kl_ctl.value, config=cfg.to_dict()), keep_last=cfg.keep_last)
        barrier()
        return save_policy

    if "before" not in summary and eval_records:
        summary["before"] = run_eval("before", eval_records)
    net.train()
    for step in range(start_step, total_steps):
        t0 = time.time()
        # 1. rollouts: G samples per prompt from the current policy, scored by the rule reward
        net.eval()
        batch, cursor, draws = collect_step(engine, processor, train_records, cfg, step, cursor, reward_fn, device,
                                            rank, world)
        net.train()
        if step == start_step and engine.compile_s is not None:
            log(f"rollout: the decode step's decoder layer compiled in {engine.compile_s:.1f} s (once for every "
                f"layer and shape)", flush=True)
        ro, t_rollout = batch["ro"], time.time() - t0
        if free_rollout:  # the update's activations get the engine's memory; the next rollout rebuilds it
            engine.release()
        # 2-3. old log-probs, advantages, then mu epochs of clipped-loss updates
        stats = grpo_update(wrapped, ref_model, optimizer, scheduler, kl_ctl, batch, cfg, device, rank, world,
                            processor.pad_token_id)
        # 4. the step's metrics, summed over ranks: rewards and safety behaviour of the samples, then the loss's
        totals = all_reduce_sum(safety_metrics.sums(batch["reward"].tolist(), batch["comps"], batch["labels"])
                                | safety_metrics.loophole_totals([c.get("loophole") for c in batch["comps"]])
                                | {"tokens": float(ro.response_mask.sum())}, device)
        m = safety_metrics.means(totals) | stats | batch["engine"] | {
            "response_len": totals["tokens"] / totals["n"], "draws": draws, "lr": scheduler.get_last_lr()[0],
            "tokens_per_s": totals["tokens"] / max(t_rollout, 1e-9), "rollout_time": t_rollout,
            "step_time": time.time() - t0}
        nonfinite += stats["skipped_updates"]
        if stats["skipped_updates"]:
            log(f"step {step + 1}: skipped {stats['skipped_updates']} update(s) with non-finite gradients "
                f"({nonfinite} so far, limit {cfg.max_nonfinite})", flush=True)
        metrics_log.log(step + 1, m)
        log(metrics_log.console(step + 1, total_steps, m), flush=True)
        if nonfinite > cfg.max_nonfinite:
            raise RuntimeError(f"stopping: {nonfinite} non-finite updates exceed --max_nonfinite={cfg.max_nonfinite}; "
                               f"the last good checkpoint is {checkpoints.latest_checkpoint(cfg.out_dir)}")
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < total_steps and eval_records:
            metrics_log.log(step + 1, {f"eval_{k}": v for k, v in run_eval(f"step {step + 1}", eval_records).items()
                                       if isinstance(v, float)})
        if cfg.save_every and (step + 1) % cfg.save_every == 0 or step + 1 == total_steps:
            save(step + 1)

    # ---- the end: held-out metrics after training, the trained model in <out_dir>/final/, curves
    if eval_records:
        summary["after"] = run_eval("after", eval_records)
        if cfg.data == "toy":
            from data import toy
            summary["after_image_blank"] = run_eval("after, images blanked", toy.blank_images(eval_records))
    save_policy, _ = full_states(wrapped, net, optimizer, cfg, extras_from=init_path, optimizer_state=False,
                                 final=True)
    if rank == 0:
        save_policy(os.path.join(cfg.out_dir, "final"))
        write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
        png = plot_curves(metrics_log.read(), os.path.join(cfg.out_dir, "curves.png"))
        log(f"the trained model: {os.path.join(cfg.out_dir, 'final')}; wrote summary.json" +
            (f" and {png}" if png else ""), flush=True)
    metrics_log.close()
    shutdown()
    return summary


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
