"""GRPO's math for SafeGRPO: advantages, reward shaping, KL estimators, the clipped loss (token log-probs and
entropies come in: logprobs.py computes them).
Pure functions of tensors; no model, no optimizer. Tests: `.venv/bin/python -m pytest -q tests/test_grpo*.py`.

Defaults = the paper's setting: GRPO trained with verl, KL to the reference as a loss term (k3, coefficient
0.01, none in the reward), clip 0.2 both sides, token-mean aggregation, advantages over the group with an
unbiased std and eps 1e-6. Every other option below is off by default and names the peer it mirrors.
Row i of a batch is sample i % G of prompt i // G; t runs over its response tokens, m_it is the mask.
  reward      r_i  -= beta sum_t m_it k(old, ref)_it   (kl_in_reward)         verl's use_kl_in_reward
              r_i  += max(-P, min(0, -(|o_i| - (L_max - L_buf)) / L_buf * P))   DAPO's overlong buffer (verl)
  advantage   A_i   = (r_i - b_i) / s                                  GRPO (Shao et al. 2024, sec. 4.1.2)
              b_i   = mean_g r;  or the mean of the G - 1 other rewards of the group  (estimator="rloo")
              s     = std_g r + eps;  std of all B rewards + eps (scale="batch", TRL);  1 (scale="none", Dr. GRPO)
  ratio       rho   = exp(clamp(logp - old_logp, -20, 20))                           token level (PPO)
              rho_i = exp(min(mean_t (logp - old_logp), 10)) at every token of row i, with the gradient
                      rho_i * grad logp_it there (a stop-gradient form)
                                                          ratio_level="sequence": GSPO (Zheng et al. 2025)
  surrogate   l     = max(-A rho, -A clip(rho, 1 - clip_low, 1 + clip_high))   PPO (Schulman et al. 2017);
                                                                        separate low/high: DAPO's clip-higher
  dual clip   l     = min(l, -A c)          for A < 0 only              Ye et al. 2020 (arXiv 1912.09729)
  TIS         l    *= min(exp(old_logp - rollout_logp), C), a constant  tis_cap=C: truncated importance
                                                                        sampling (verl, TRL)
  KL          k1 = logp - ref;  k2 = (logp - ref)^2 / 2;  abs = |logp - ref|;
              k3 = exp(d) - d - 1, d = clamp(ref - logp, -20, 20), value clamped to [-10, 10]
                                                  Schulman, "Approximating KL divergence" (2020); verl low_var_kl
  loss        agg(l) + kl_coef * agg(k) - entropy_coef * agg(H)   (KL as a loss term: verl's use_kl_loss;
              H = entropy of the policy's softmax(logits / temperature), coefficient 0 in the paper)
  agg         token-mean:              sum_it m l / N_tok          N_tok = response tokens in the mini-batch
              token-mean-micro:        (1 / M) sum_mb (sum_{it in mb} m l / N_tok(mb))    M = micro-batches
              seq-mean-token-mean:     sum_i (sum_t m l / |o_i|) / N_seq
              seq-mean-token-sum-norm: sum_i (sum_t m l / C) / N_seq     C = norm_constant (Dr. GRPO: max length)
              N_tok, N_seq, M count the whole mini-batch (all micro-batches, all ranks); N_seq counts sequences
              with >= 1 response token.
Which token-mean the paper ran: its verl version (0.6, late 2025) computed token-mean-micro: each micro-batch
took its own token mean, scaled by 1 / (gradient-accumulation steps), and ranks were averaged. A token in a
micro-batch of short responses then weighs more than one among long responses, and the gradient changes
with the micro-batch size and the world size. The default here is the global token-mean (what later verl
versions and TRL do): every token weighs 1 / N_tok, the same gradient however the batch is cut. The two
agree when every micro-batch holds the same number of response tokens.
Where we differ from verl:
  - A group whose rewards are all equal gets advantage exactly 0 (verl: (r - mean)/(0 + eps), ~0 up to
    rounding); a group of size 1 gets 0 (verl: mean 0, std 1, so A = r / (1 + eps)).
  - Dual clip is off unless dual_clip is given; verl's vanilla loss always applies it with c = 3.0, so a
    faithful run passes dual_clip=3.0.
  - seq-mean-token-sum-norm divides by N_seq; verl sums the sequences of a micro-batch (no 1/N_seq), i.e.
    ours is verl's divided by the micro-batch size: a constant factor that the learning rate absorbs.
  - Counts are passed in (loss_normalizer, see agg_normalizer). Entropy is a stat unless entropy_coef != 0.
"""
import torch

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")  # global: split-invariant
LOSS_AGG_MODES = AGG_MODES + ("token-mean-micro",)  # all that policy_loss takes
KL_KINDS = ("k1", "k2", "k3", "abs")
ADV_ESTIMATORS = ("grpo", "rloo")
ADV_SCALES = ("group", "batch", "none")
RATIO_LEVELS = ("token", "sequence")


# ----------------------------------------------------------------------------- advantages

def _grouped_rewards(rewards, group_size, caller):
    """(B,) rewards -> float64 (n_groups, G), checked. float64: group means of a few rewards, no drift."""
    r = torch.as_tensor(rewards, dtype=torch.float64)
    if r.dim() != 1:
        raise ValueError(f"{caller}: rewards must be 1-D (B,), got shape {tuple(r.shape)}")
    if not isinstance(group_size, int) or group_size < 1 or r.numel() % group_size != 0:
        raise ValueError(f"{caller}: {r.numel()} rewards (shape {tuple(r.shape)}) cannot be split "
                         f"into groups of group_size={group_size}")
    if not torch.isfinite(r).all():
        bad = torch.nonzero(~torch.isfinite(r)).flatten().tolist()
        raise ValueError(f"{caller}: non-finite rewards at rows {bad[:10]}")
    return r.view(-1, group_size)


def _constant_groups(r):
    """(n_groups, G) -> (n_groups, 1) bool: every reward of the group equal (exactly, not up to eps)."""
    return (r == r[:, :1]).all(dim=1, keepdim=True)


def group_advantages(rewards, group_size, scale="group", eps=1e-6, unbiased=True, estimator="grpo"):
    """(B,) rewards, rows grouped as [prompt 0 x G, prompt 1 x G, ...] -> (B,) float32 advantages.

    estimator: "grpo" subtracts the group mean; "rloo" the mean of the group's other G - 1 rewards
    (leave-one-out: G / (G - 1) times the grpo difference; verl's rloo and TRL's RLOO use scale="none").
    scale: "group" divides by the group's std + eps; "batch" by the std of all B rewards + eps (TRL's
    scale_rewards="batch": pass the whole step's rewards); "none" does not divide (Dr. GRPO).
    A group whose rewards are all equal gets exactly 0 in every mode.
    """
    if scale not in ADV_SCALES:
        raise ValueError(f"group_advantages: scale must be one of {ADV_SCALES}, got {scale!r}")
    if estimator not in ADV_ESTIMATORS:
        raise ValueError(f"group_advantages: estimator must be one of {ADV_ESTIMATORS}, got {estimator!r}")
    r = _grouped_rewards(rewards, group_size, "group_advantages")  # (n_groups, G)
    if group_size == 1:  # one sample carries no relative signal (and RLOO's baseline is undefined)
        return torch.zeros(r.numel())
    adv = r - r.mean(dim=1, keepdim=True)
    if estimator == "rloo":  # r_i - (sum_g r - r_i) / (G - 1) = G / (G - 1) * (r_i - mean_g r)
        adv = adv * (group_size / (group_size - 1))
    if scale == "group":
        adv = adv / (r.std(dim=1, correction=int(unbiased), keepdim=True) + eps)
    elif scale == "batch":
        adv = adv / (r.std(correction=int(unbiased)) + eps)
    # all-equal group: no learning signal. Force exact zeros (rounding in the mean can leave ~1e-17 / eps).
    adv = torch.where(_constant_groups(r), torch.zeros_like(adv), adv)
    return adv.reshape(-1).float()


def informative_groups(rewards, group_size):
    """(B,) rewards -> (n_groups,) bool: True where the group's rewards are not all equal.

    DAPO's dynamic sampling (verl's filter_groups) keeps only these groups and draws more prompts until the
    batch is full: the others get advantage 0 and only dilute the loss. Same equality rule as
    group_advantages. Groups of size 1 are never informative here (verl keeps them; their advantage is 0).
    Rows of group j are j * G .. j * G + G - 1; `mask.repeat_interleave(G)` gives a per-row mask.
    """
    r = _grouped_rewards(rewards, group_size, "informative_groups")
    return ~_constant_groups(r).squeeze(1)


# ----------------------------------------------------------------------------- KL to the reference

def kl_penalty(logprobs, ref_logprobs, kind="k3"):
    """Per-token KL(policy || ref) estimate from the sampled tokens' log-probs; same shape as the inputs.

    Values: E_policy[k1] = E_policy[k3] = KL(policy || ref). Gradients (the estimate is differentiated
    through logprobs only, the tokens being fixed samples): E[grad k2] = grad KL(policy || ref), while
    E[grad k3] = grad KL(ref || policy) and E[grad k1] = 0. tests/test_grpo.py pins all of these.
    """
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"kl_penalty: logprobs {tuple(logprobs.shape)} and ref_logprobs "
                         f"{tuple(ref_logprobs.shape)} must have the same shape")
    if kind == "k1":
        return logprobs - ref_logprobs
    if kind == "k2":
        return 0.5 * (logprobs - ref_logprobs).square()
    if kind == "abs":
        return (logprobs - ref_logprobs).abs()
    if kind == "k3":  # low_var_kl: clamps keep exp() finite when the two policies disagree wildly
        d = torch.clamp(ref_logprobs - logprobs, -20.0, 20.0)
        return torch.clamp(torch.exp(d) - d - 1.0, -10.0, 10.0)
    raise ValueError(f"kl_penalty: kind must be one of {KL_KINDS}, got {kind!r}")


# ----------------------------------------------------------------------------- reward shaping
# Options on the (B,) sequence rewards, applied before group_advantages; all off in the paper's setting.

def kl_in_reward(rewards, old_logprobs, ref_logprobs, response_mask, kl_coef, kind="k1"):
    """KL to the reference folded into the sequence rewards -> (shaped (B,), batch_kl 0-d), float32.

      shaped_i = r_i - kl_coef * sum_t m_it k(old_it, ref_it)
      batch_kl = mean_i (sum_t m_it k_it / |o_i|)      (an empty row counts 0)
    verl's use_kl_in_reward: a per-token penalty on the behaviour policy's log-probs (old_logprobs, no
    gradient), summed over the response because GRPO's outcome advantage sums the token-level rewards.
    shaped goes to group_advantages in place of the rewards; batch_kl is what verl updates its KL
    controller with (controller.update(batch_kl, n_steps=B)); kl_coef is the controller's value. kind: a
    kl_penalty kind, k1 being verl's default here. The paper keeps KL in the loss instead (kl_coef of policy_loss).
    """
    mask = response_mask.bool()
    if not old_logprobs.shape == ref_logprobs.shape == mask.shape or mask.dim() != 2:
        raise ValueError(f"kl_in_reward: old_logprobs {tuple(old_logprobs.shape)}, ref_logprobs "
                         f"{tuple(ref_logprobs.shape)} and response_mask {tuple(mask.shape)} must be equal (B, T)")
    rewards = torch.as_tensor(rewards, dtype=torch.float32, device=old_logprobs.device)
    if tuple(rewards.shape) != (mask.shape[0],):
        raise ValueError(f"kl_in_reward: rewards must be (B,) = ({mask.shape[0]},), got {tuple(rewards.shape)}")
    with torch.no_grad():
        zero = torch.zeros_like(old_logprobs, dtype=torch.float32)
        # padding may hold anything: zero both sides first so the penalty there is exactly 0 (for any kind)
        old = torch.where(mask, old_logprobs.float(), zero)
        ref = torch.where(mask, ref_logprobs.float(), zero)
        kl = torch.where(mask, kl_penalty(old, ref, kind), zero)  # (B, T)
        shaped = rewards - kl_coef * kl.sum(dim=-1)
        batch_kl = (kl.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)).mean()
    return shaped, batch_kl


class FixedKLController:
    """beta = kl_coef for the whole run (verl's FixedKLController, its default kl_ctrl type)."""

    def __init__(self, kl_coef):
        self.value = float(kl_coef)

    def update(self, current_kl, n_steps):
        pass


class AdaptiveKLController:
    """Proportional control of beta toward a target KL (Ziegler et al. 2019; verl's AdaptiveKLController):

      e = clip(current_kl / target_kl - 1, -0.2, 0.2);   beta <- beta * (1 + e * n_steps / horizon)
    current_kl: kl_in_reward's batch_kl; n_steps: the samples it came from (verl passes the batch size B).
    verl's defaults: target_kl 0.1, horizon 10000. The state is `value`, a float to checkpoint.
    """

    def __init__(self, init_kl_coef, target_kl, horizon):
        if not (target_kl > 0 and horizon > 0):
            raise ValueError(f"AdaptiveKLController: need target_kl > 0 and horizon > 0, got {target_kl}, "
                             f"{horizon}")
        self.value, self.target_kl, self.horizon = float(init_kl_coef), float(target_kl), float(horizon)

    def update(self, current_kl, n_steps):
        error = min(max(float(current_kl) / self.target_kl - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def overlong_penalty(response_lengths, max_len, buffer, penalty_factor=1.0):
    """DAPO's soft overlong punishment (verl's overlong_buffer) -> (B,) float32 <= 0, added to the rewards.

      0 for L <= max_len - buffer; then linear, -(L - (max_len - buffer)) / buffer * penalty_factor, down to
      -penalty_factor at L = max_len (and beyond, which the sampler's cap never produces; the DAPO paper's -1).
    response_lengths: (B,) response tokens per row; max_len: the sampler's cap on new tokens.
    """
    if not (0 < buffer <= max_len and penalty_factor >= 0):
        raise ValueError(f"overlong_penalty: need 0 < buffer <= max_len and penalty_factor >= 0, got buffer "
                         f"{buffer}, max_len {max_len}, penalty_factor {penalty_factor}")
    lengths = torch.as_tensor(response_lengths, dtype=torch.float32)
    excess = (lengths - (max_len - buffer)).clamp(min=0.0, max=float(buffer))  # tokens into the buffer
    return -excess / buffer * penalty_factor


# ----------------------------------------------------------------------------- aggregation

def agg_normalizer(response_mask, agg="token-mean", micro_batch_size=None):
    """This mask's count for `agg` (0-d int64): response tokens (token-mean), sequences with >= 1 of them
    (seq-mean-*), or micro-batches of micro_batch_size rows (token-mean-micro; None: the mask is one).

    The caller takes it over the whole mini-batch (or sums it over its micro-batches; both give the same
    total), all-reduces (SUM) over ranks, and passes the total as policy_loss(loss_normalizer=...).
    """
    if agg not in LOSS_AGG_MODES:
        raise ValueError(f"agg must be one of {LOSS_AGG_MODES}, got {agg!r}")
    mask = response_mask.bool()
    if agg == "token-mean":
        return mask.sum()
    if agg == "token-mean-micro":
        if micro_batch_size is not None and not (isinstance(micro_batch_size, int) and micro_batch_size >= 1):
            raise ValueError(f"agg_normalizer: micro_batch_size must be an int >= 1 or None, got {micro_batch_size}")
        rows = mask.shape[0]
        n = 1 if micro_batch_size is None else -(-rows // micro_batch_size)  # ceil: the last may be short
        return torch.tensor(n, dtype=torch.int64, device=mask.device)
    return (mask.sum(dim=-1) > 0).sum()


def _aggregate(x, mask, agg, loss_normalizer, norm_constant):
    """Scalar from per-token values x (B, T) over mask (B, T); see the table at the top of the file."""
    x = torch.where(mask, x, torch.zeros_like(x))
    # with no normalizer given, this call is the whole batch; clamp so an empty one gives 0, not NaN
    n = agg_normalizer(mask, agg).clamp(min=1) if loss_normalizer is None else loss_normalizer
    if agg == "token-mean":
        return x.sum() / n
    if agg == "token-mean-micro":  # this micro-batch's own token mean, one of n equal shares
        return x.sum() / mask.sum().clamp(min=1) / n
    if agg == "seq-mean-token-mean":
        per_seq = x.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)  # (B,)
    else:  # seq-mean-token-sum-norm: one constant divisor, so long responses are not down-weighted
        per_seq = x.sum(dim=-1) / norm_constant
    return per_seq.sum() / n


def mask_truncated(response_mask, truncated):
    """response_mask (B, T) with the rows where truncated (B,) is True zeroed: those responses leave the loss.

    DAPO's overlong filtering (TRL's mask_truncated_completions): a response cut at the length cap has no
    ending to judge, so it gets no gradient. Their rewards still enter the group statistics. Pass the
    returned mask to policy_loss and to agg_normalizer (the counts change with it).
    """
    truncated = torch.as_tensor(truncated, dtype=torch.bool, device=response_mask.device)
    if tuple(truncated.shape) != (response_mask.shape[0],):
        raise ValueError(f"mask_truncated: truncated must be (B,) = ({response_mask.shape[0]},), got "
                         f"{tuple(truncated.shape)}")
    return response_mask * (~truncated).unsqueeze(-1).to(response_mask.dtype)


# ----------------------------------------------------------------------------- the loss

def _check_shapes(logprobs, old_logprobs, advantages, response_mask, ref_logprobs, entropy, rollout_logprobs):
    shapes = {"logprobs": logprobs, "old_logprobs": old_logprobs, "response_mask": response_mask}
    if ref_logprobs is not None:
        shapes["ref_logprobs"] = ref_logprobs
    if rollout_logprobs is not None:
        shapes["rollout_logprobs"] = rollout_logprobs
    if entropy is not None:
        shapes["entropy"] = entropy
    named = ", ".join(f"{k} {tuple(v.shape)}" for k, v in shapes.items())
    if logprobs.dim() != 2 or logprobs.numel() == 0 or any(v.shape != logprobs.shape for v in shapes.values()):
        raise ValueError(f"policy_loss: need equal non-empty (B, T) shapes; got {named}")
    B, T = logprobs.shape
    if tuple(advantages.shape) not in ((B,), (B, T)):
        raise ValueError(f"policy_loss: advantages must be (B,) = ({B},) or (B, T) = ({B}, {T}); got "
                         f"{tuple(advantages.shape)} with {named}")


def policy_loss(logprobs, old_logprobs, advantages, response_mask, clip_low=0.2, clip_high=0.2,
                dual_clip=None, ref_logprobs=None, kl_coef=0.0, kl_kind="k3", agg="token-mean",
                loss_normalizer=None, norm_constant=None, entropy=None, entropy_coef=0.0,
                ratio_level="token", rollout_logprobs=None, tis_cap=None):
    """Clipped GRPO surrogate (+ kl_coef * KL) on one micro-batch -> (loss, stats).

    logprobs (B, T) with grad; old_logprobs, ref_logprobs (B, T) fixed; advantages (B,) or (B, T);
    response_mask (B, T) 0/1; entropy (B, T) optional, the policy's per-token entropy (logprobs.token_entropy): the
    entropy stat, and the bonus -entropy_coef * agg(entropy) in the loss when entropy_coef != 0 (then it must carry
    its gradient; verl's entropy_coeff; paper: 0).
    loss_normalizer: the mini-batch's N_tok (token-mean), N_seq (seq-mean-*) or micro-batch count M
    (token-mean-micro) over all ranks, see agg_normalizer; None means this call is the whole batch. The
    loss is then this micro-batch's share: the shares of all micro-batches and ranks add up to the
    mini-batch loss (a DDP/FSDP gradient *average* over W ranks must be undone by multiplying the loss
    by W). norm_constant: C for seq-mean-token-sum-norm.
    ratio_level="sequence": GSPO's ratio, one per sequence (verl's gspo loss, TRL's importance_sampling_level;
    verl aggregates it with seq-mean-token-mean and GSPO's paper clips at 3e-4 / 4e-4: pass those to match).
    tis_cap=C with rollout_logprobs (B, T), the sampler's log-probs: truncated importance sampling, each
    token's surrogate times min(exp(old_logprobs - rollout_logprobs), C), detached (verl's
    tis_imp_ratio_cap, TRL's vllm_importance_sampling_cap); useful when old_logprobs are the trainer's
    recomputed ones, since with the sampler's own the weight is 1.
    stats: detached 0-d float32 tensors on the input's device. `loss`, `pg_loss`, `kl` are shares like
    the loss (sum them over micro-batches); the rest describe this call's n_tokens response tokens:
    clipfrac_low/high/dual (fraction of tokens where that clip is active: zero gradient), ratio_mean,
    ratio_min/max (1.0 when n_tokens = 0, finite so that a token-weighted average ignores them),
    ppo_kl = mean(old - logp), entropy (when given; token mean, not a share), and with tis_cap:
    tis_weight_mean, tis_capfrac (fraction of tokens whose weight was capped).
    """
    _check_shapes(logprobs, old_logprobs, advantages, response_mask, ref_logprobs, entropy, rollout_logprobs)
    if agg not in LOSS_AGG_MODES:
        raise ValueError(f"policy_loss: agg must be one of {LOSS_AGG_MODES}, got {agg!r}")
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"policy_loss: ratio_level must be one of {RATIO_LEVELS}, got {ratio_level!r}")
    if tis_cap is not None and not (tis_cap > 0 and rollout_logprobs is not None):
        raise ValueError(f"policy_loss: tis_cap={tis_cap} needs tis_cap > 0 and rollout_logprobs (the sampler's)")
    if agg == "seq-mean-token-sum-norm" and (norm_constant is None or not norm_constant > 0):
        raise ValueError("policy_loss: agg='seq-mean-token-sum-norm' needs norm_constant > 0 (Dr. GRPO uses "
                         f"the max response length, fixed for the run); got {norm_constant}")
    if not (0 <= clip_low < 1 and clip_high >= 0):
        raise ValueError(f"policy_loss: need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"policy_loss: dual_clip must be > 1 (verl uses 3.0), got {dual_clip}")
    if entropy_coef != 0 and entropy is None:
        raise ValueError(f"policy_loss: entropy_coef={entropy_coef} needs the entropies")
    if kl_coef != 0 and ref_logprobs is None:
        raise ValueError(f"policy_loss: kl_coef={kl_coef} needs ref_logprobs")
    if isinstance(loss_normalizer, (int, float)) and not loss_normalizer > 0:
        raise ValueError(f"policy_loss: loss_normalizer must be > 0, got {loss_normalizer}")

    mask = response_mask.bool()
    zero = torch.zeros_like(logprobs)
    # padding may hold anything (even -inf/NaN); zero it first so no NaN reaches the graph
    logp = torch.where(mask, logprobs, zero)
    old = torch.where(mask, old_logprobs.to(logprobs.dtype), zero)
    adv = advantages.to(logprobs.dtype)
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv  # (B, 1) or (B, T)

    if ratio_level == "token":
        log_ratio = torch.clamp(logp - old, -20.0, 20.0)  # as verl: exp stays finite
    else:  # GSPO: log s_i = mean_t (logp - old) over row i's tokens, the same value at each of them
        log_s = (logp - old).sum(dim=-1, keepdim=True) / mask.sum(dim=-1, keepdim=True).clamp(min=1)  # (B, 1)
        # logp - sg(logp) is 0 in value but carries grad logp_it, so d rho_it = s_i d logp_it: the
        # gradient of s_i = exp(mean_t logp) spread as s_i / |o_i| per token once agg takes the token mean.
        # Capped at 10 as verl (there the gradient stops), no floor: exp of a very negative value is 0.
        log_ratio = torch.clamp(logp - logp.detach() + log_s.detach(), max=10.0)
    ratio = torch.exp(log_ratio)  # (B, T)
    pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high))
    if dual_clip is not None:  # a very negative A times a huge ratio would be an unbounded loss
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * dual_clip), pg)
    tis_weight = None
    if tis_cap is not None:  # the sampler is not exactly the trainer's old policy: reweight to it, capped
        rollout = torch.where(mask, rollout_logprobs.to(logprobs.dtype), zero)
        tis_weight = torch.exp(old - rollout).clamp(max=tis_cap).detach()  # (B, T); exp(20+) = inf -> C
        pg = pg * tis_weight
    pg_loss = _aggregate(pg, mask, agg, loss_normalizer, norm_constant)
    loss = pg_loss

    kl = None
    if ref_logprobs is not None:
        ref = torch.where(mask, ref_logprobs.to(logprobs.dtype), zero)
        kl = _aggregate(kl_penalty(logp, ref, kl_kind), mask, agg, loss_normalizer, norm_constant)
        if kl_coef != 0:
            loss = loss + kl_coef * kl

    if entropy is not None and entropy_coef != 0:  # maximize entropy: subtract, aggregated like the rest
        entropy = torch.where(mask, entropy.to(logprobs.dtype), zero)
        loss = loss - entropy_coef * _aggregate(entropy, mask, agg, loss_normalizer, norm_constant)

    with torch.no_grad():
        n_tokens = mask.sum()
        one = torch.ones((), dtype=ratio.dtype, device=ratio.device)

        def token_mean(v):  # mean over this call's response tokens
            return torch.where(mask, v.float(), torch.zeros_like(ratio)).sum() / n_tokens.clamp(min=1)

        stats = {
            "loss": loss.detach().float(),
            "pg_loss": pg_loss.detach().float(),
            "kl": kl.detach().float() if kl is not None else ratio.new_zeros(()),
            # clip active = the clipped branch is chosen strictly, so this token sends no gradient
            "clipfrac_high": token_mean((adv > 0) & (ratio > 1.0 + clip_high)),
            "clipfrac_low": token_mean((adv < 0) & (ratio < 1.0 - clip_low)),
            "clipfrac_dual": token_mean((adv < 0) & (ratio > dual_clip)) if dual_clip is not None
            else ratio.new_zeros(()),
            "ratio_mean": token_mean(ratio),
            "ratio_min": torch.where(n_tokens > 0, torch.where(mask, ratio, ratio.max()).amin(), one),
            "ratio_max": torch.where(n_tokens > 0, torch.where(mask, ratio, ratio.min()).amax(), one),
            "ppo_kl": token_mean(old - logp),
            "n_tokens": n_tokens.float(),
        }
        if entropy is not None:
            stats["entropy"] = token_mean(entropy)
        if tis_weight is not None:
            stats["tis_weight_mean"] = token_mean(tis_weight)
            stats["tis_capfrac"] = token_mean(torch.exp(old - rollout) > tis_cap)
        stats = {k: v.detach().to(torch.float32) for k, v in stats.items()}
    return loss, stats
