"""grpo.py's options beyond the paper's setting, each pinned by numbers worked out by hand in the comments:
token-mean-micro, KL in the reward and its controllers, DAPO (overlong penalty, dynamic sampling, truncated
masking), GSPO's sequence ratio, truncated importance sampling, RLOO and batch-level reward scaling.
Run: `.venv/bin/python -m pytest -q tests/test_grpo_variants.py` (about a second on CPU)."""
import math

import pytest
import torch

import grpo
from grpo import (AdaptiveKLController, FixedKLController, agg_normalizer, group_advantages, informative_groups,
                  kl_in_reward, mask_truncated, overlong_penalty, policy_loss)

E = math.e
LN2 = math.log(2.0)


def close(x, expected, tol=1e-6):
    x, expected = float(torch.as_tensor(x).detach()), float(expected)
    assert x == pytest.approx(expected, abs=tol), (x, expected)


# ----------------------------------------------------------------------------- token-mean vs token-mean-micro

def _split_loss(agg, adv, lengths, micro_batch):
    """policy_loss at ratio 1 (per-token loss -A) on rows of the given lengths, summed over micro-batches
    of micro_batch rows with the caller's recipe for the normalizer; returns (loss, d loss / d logp)."""
    B, T = len(lengths), max(lengths)
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    adv = torch.tensor(adv)
    logp = torch.zeros(B, T, requires_grad=True)
    # the whole mini-batch's count, computed once, as the trainer does (micro_batch_size for the micro mode)
    normalizer = agg_normalizer(mask, agg, micro_batch_size=micro_batch)
    total = 0.0
    for s in range(0, B, micro_batch):
        rows = slice(s, s + micro_batch)
        loss, _ = policy_loss(logp[rows], torch.zeros(micro_batch, T), adv[rows], mask[rows], agg=agg,
                              loss_normalizer=normalizer, norm_constant=4)
        loss.backward()
        total += float(loss.detach())
    return total, logp.grad


@pytest.mark.parametrize("agg,whole,split", [
    # row 0: 3 tokens at A = 1 (loss -1 each); row 1: 1 token at A = 3 (loss -3). 4 tokens, 2 sequences.
    ("token-mean", (-3 - 3) / 4, -3 / 4 - 3 / 4),  # split: each micro-batch's share is its sum / 4
    ("token-mean-micro", (-3 - 3) / 4, (-3 / 3 + -3 / 1) / 2),  # split: mean of the micro-batch means -1, -3
    ("seq-mean-token-mean", (-1 - 3) / 2, (-1 - 3) / 2),  # row means -1, -3 over N_seq = 2
    ("seq-mean-token-sum-norm", (-3 / 4 - 3 / 4) / 2, (-3 / 4 - 3 / 4) / 2),  # C = 4
])
def test_only_token_mean_micro_depends_on_the_micro_batch_split(agg, whole, split):
    loss_whole, grad_whole = _split_loss(agg, [1.0, 3.0], [3, 1], micro_batch=2)
    loss_split, grad_split = _split_loss(agg, [1.0, 3.0], [3, 1], micro_batch=1)
    close(loss_whole, whole)
    close(loss_split, split)
    if agg != "token-mean-micro":  # the global modes: the same loss and gradient however the batch is cut
        torch.testing.assert_close(grad_split, grad_whole)


def test_token_mean_micro_gradient_weighs_tokens_by_their_micro_batch():
    # d loss / d logp_t = -A / (N_tok(mb) * M): split into M = 2 micro-batches, row 0's tokens get -1 / (3 * 2)
    # and row 1's token -3 / (1 * 2); in one micro-batch (M = 1, 4 tokens), -1 / 4 and -3 / 4 as token-mean
    _, grad = _split_loss("token-mean-micro", [1.0, 3.0], [3, 1], micro_batch=1)
    torch.testing.assert_close(grad, torch.tensor([[-1 / 6, -1 / 6, -1 / 6], [-3 / 2, 0.0, 0.0]]))
    _, grad = _split_loss("token-mean-micro", [1.0, 3.0], [3, 1], micro_batch=2)
    torch.testing.assert_close(grad, torch.tensor([[-1 / 4, -1 / 4, -1 / 4], [-3 / 4, 0.0, 0.0]]))
    # equal token counts per micro-batch: the two token-means agree, (-2 - 6) / 4 = (-1 - 3) / 2 = -2
    close(_split_loss("token-mean-micro", [1.0, 3.0], [2, 2], micro_batch=1)[0], -2.0)
    close(_split_loss("token-mean", [1.0, 3.0], [2, 2], micro_batch=1)[0], -2.0)


def test_agg_normalizer_token_mean_micro_counts_micro_batches():
    mask = torch.ones(5, 3)
    assert agg_normalizer(mask, "token-mean-micro") == 1  # no micro_batch_size: the mask is one micro-batch
    assert agg_normalizer(mask, "token-mean-micro", micro_batch_size=2) == 3  # rows 2 + 2 + 1
    assert agg_normalizer(mask, "token-mean-micro", micro_batch_size=5) == 1
    # the other recipe, summing over the micro-batches, gives the same total
    assert sum(agg_normalizer(mask[s:s + 2], "token-mean-micro") for s in range(0, 5, 2)) == 3
    assert agg_normalizer(mask, "token-mean", micro_batch_size=2) == 15  # ignored by the global modes
    with pytest.raises(ValueError, match="micro_batch_size"):
        agg_normalizer(mask, "token-mean-micro", micro_batch_size=0)
    # an empty micro-batch is a zero share, not NaN
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, stats = policy_loss(logp, logp.detach(), torch.ones(2), torch.zeros(2, 3), agg="token-mean-micro",
                              loss_normalizer=2)
    assert float(loss.detach()) == 0.0 and all(math.isfinite(float(v)) for v in stats.values())


# ----------------------------------------------------------------------------- KL in the reward

def _kl_batch():
    # row 0: 3 tokens, row 1: 1 token, row 2: empty; padding holds garbage that must not leak
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, float("nan"), -float("inf")], [float("nan")] * 3])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-1.2, float("inf"), 3.0], [-float("inf")] * 3])
    return torch.tensor([1.0, 0.0, 0.5]), old, ref, mask


def test_kl_in_reward_golden_k1_and_k3():
    rewards, old, ref, mask = _kl_batch()
    # k1 = old - ref: row 0 (0.5, -1, 0), sum -0.5, mean -1/6; row 1 (1.0), sum 1, mean 1; row 2 nothing
    shaped, batch_kl = kl_in_reward(rewards, old, ref, mask, kl_coef=0.1, kind="k1")
    torch.testing.assert_close(shaped, torch.tensor([1 - 0.1 * -0.5, 0 - 0.1 * 1.0, 0.5]))  # (1.05, -0.1, 0.5)
    close(batch_kl, (-1 / 6 + 1 + 0) / 3)  # mean over rows of the per-row token means = 5/18
    assert shaped.dtype == torch.float32 and not shaped.requires_grad
    # k3 = e^d - d - 1 with d = ref - old: row 0 d = (-0.5, 1, 0) -> (e^-0.5 - 0.5, e - 2, 0); row 1 d = -1 -> e^-1
    k3_row0 = (math.exp(-0.5) - 0.5) + (E - 2)  # 0.106531 + 0.718282 = 0.824813
    shaped, batch_kl = kl_in_reward(rewards, old, ref, mask, kl_coef=0.1, kind="k3")
    torch.testing.assert_close(shaped, torch.tensor([1 - 0.1 * k3_row0, -0.1 / E, 0.5]))
    close(batch_kl, (k3_row0 / 3 + 1 / E) / 3)
    # kl_coef 0: the rewards unchanged
    torch.testing.assert_close(kl_in_reward(rewards, old, ref, mask, kl_coef=0.0)[0], rewards)
    with pytest.raises(ValueError, match=r"ref_logprobs \(3, 2\)"):
        kl_in_reward(rewards, old, ref[:, :2], mask, kl_coef=0.1)


def test_kl_in_reward_feeds_the_group_advantage():
    # a group of two equal rewards 1, 1 that differ in KL (sums 0 and 2, beta 0.5) -> shaped (1, 0):
    # no longer constant, the low-KL response is preferred: A = +-0.5 / std(1, 0) = +-0.5 / 0.7071 = +-0.7071
    old = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]])
    ref = torch.tensor([[-1.0, -1.0], [-2.0, -2.0]])
    shaped, _ = kl_in_reward([1.0, 1.0], old, ref, torch.ones(2, 2), kl_coef=0.5)
    torch.testing.assert_close(shaped, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(group_advantages(shaped, 2, eps=0.0), torch.tensor([0.5, -0.5]) / math.sqrt(0.5))


def test_kl_controllers_golden():
    fixed = FixedKLController(0.05)
    fixed.update(current_kl=10.0, n_steps=100)
    assert fixed.value == 0.05
    # target 0.1, horizon 100: e = clip(kl / 0.1 - 1, -0.2, 0.2), beta *= 1 + e * n / 100
    ctrl = AdaptiveKLController(init_kl_coef=0.1, target_kl=0.1, horizon=100)
    ctrl.update(current_kl=0.15, n_steps=10)  # e = 0.5 -> clipped to 0.2: beta = 0.1 * 1.02 = 0.102
    assert ctrl.value == pytest.approx(0.102, abs=1e-12)
    ctrl.update(current_kl=0.11, n_steps=10)  # e = 0.1: beta = 0.102 * 1.01 = 0.10302
    assert ctrl.value == pytest.approx(0.10302, abs=1e-12)
    ctrl.update(current_kl=0.0, n_steps=50)  # e = -1 -> -0.2: beta = 0.10302 * (1 - 0.1) = 0.092718
    assert ctrl.value == pytest.approx(0.092718, abs=1e-12)
    ctrl.update(current_kl=0.1, n_steps=50)  # on target: unchanged
    assert ctrl.value == pytest.approx(0.092718, abs=1e-12)
    with pytest.raises(ValueError, match="target_kl"):
        AdaptiveKLController(0.1, target_kl=0.0, horizon=100)


# ----------------------------------------------------------------------------- DAPO

def test_overlong_penalty_golden():
    # max_len 16, buffer 4, factor 0.5: free up to 16 - 4 = 12, then -(L - 12) / 4 * 0.5 down to -0.5 at 16
    pen = overlong_penalty([0, 10, 12, 13, 14, 16, 20], max_len=16, buffer=4, penalty_factor=0.5)
    torch.testing.assert_close(pen, torch.tensor([0.0, 0.0, 0.0, -0.125, -0.25, -0.5, -0.5]))
    assert pen.dtype == torch.float32
    # the DAPO paper's form (factor 1): (12 - L) / 4 inside the buffer
    close(overlong_penalty(torch.tensor([15]), 16, 4)[0], -0.75)
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty([3], max_len=16, buffer=0)
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty([3], max_len=16, buffer=17)


def test_informative_groups_golden():
    rewards = [1, 0,  1, 1,  0.5, 0.5,  0, 0.3]
    keep = informative_groups(rewards, 2)
    assert keep.tolist() == [True, False, False, True]
    # exactly the groups whose advantage is not all zero, in every estimator and scale
    for estimator in grpo.ADV_ESTIMATORS:
        for scale in grpo.ADV_SCALES:
            adv = group_advantages(rewards, 2, scale=scale, estimator=estimator).view(-1, 2)
            assert ((adv != 0).any(dim=1) == keep).all()
    assert keep.repeat_interleave(2).tolist() == [True, True, False, False, False, False, True, True]
    assert informative_groups([0.3, 1.0], 1).tolist() == [False, False]  # a single sample: advantage 0
    with pytest.raises(ValueError, match=r"5 rewards.*group_size=2"):
        informative_groups([0, 1, 0, 1, 0], 2)


def test_mask_truncated_golden():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    out = mask_truncated(mask, [True, False, False])  # row 0 hit the cap
    assert out.tolist() == [[0, 0, 0], [1, 1, 0], [1, 0, 0]] and out.dtype == mask.dtype
    assert mask_truncated(mask.bool(), torch.tensor([False, True, False])).tolist() == \
        [[True, True, True], [False, False, False], [True, False, False]]
    # in the loss: row 0 (A = 5) is gone; rows 1 and 2 at ratio 1: (-1 - 1 - 2) / 3 tokens
    loss, stats = policy_loss(torch.zeros(3, 3), torch.zeros(3, 3), torch.tensor([5.0, 1.0, 2.0]), out)
    close(loss, -4 / 3)
    close(stats["n_tokens"], 3)
    assert agg_normalizer(out, "token-mean") == 3 and agg_normalizer(out, "seq-mean-token-mean") == 2
    with pytest.raises(ValueError, match=r"\(3,\).*\(2,\)"):
        mask_truncated(mask, [True, False])


# ----------------------------------------------------------------------------- GSPO

def _gspo_batch():
    # log ratios logp - old: row 0 (0.1, -0.3), row 1 (0.5), row 2 (0.3, 0.3, 0.6); old is not 0 on purpose
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    old = torch.tensor([[0.1, 0.1, -float("inf")], [-1.0, -float("inf"), 0.0], [-0.5, -0.5, -0.5]])
    logp = torch.tensor([[0.2, -0.2, float("nan")], [-0.5, float("nan"), 9.0], [-0.2, -0.2, 0.1]])
    return logp.requires_grad_(), old, torch.tensor([1.0, 1.0, -1.0]), mask


def test_gspo_sequence_ratio_loss_and_gradient_golden():
    logp, old, adv, mask = _gspo_batch()
    loss, stats = policy_loss(logp, old, adv, mask, ratio_level="sequence", agg="seq-mean-token-mean")
    # s_i = exp(mean_t log ratio): s0 = e^-0.1 = 0.904837, s1 = e^0.5 = 1.648721, s2 = e^0.4 = 1.491825
    #   row 0, A = +1: s0 inside [0.8, 1.2]: -s0 at each token
    #   row 1, A = +1: s1 > 1.2: clipped to -1.2, no gradient
    #   row 2, A = -1: max(s2, 1.2) = s2 (the pessimistic side, unclipped), s2 at each token
    # seq-mean-token-mean over N_seq = 3: (-s0 - 1.2 + s2) / 3
    s0, s2 = math.exp(-0.1), math.exp(0.4)
    close(loss, (-s0 - 1.2 + s2) / 3)
    loss.backward()
    # each token's rho carries the gradient s_i d logp_t; the row mean and 1 / N_seq give -A_i s_i / (|o_i| * 3):
    #   row 0: -s0 / 6 at both tokens; row 2: s2 / 9 at each of three; padding 0
    expected = torch.tensor([[-s0 / 6, -s0 / 6, 0.0], [0.0, 0.0, 0.0], [s2 / 9, s2 / 9, s2 / 9]])
    torch.testing.assert_close(logp.grad, expected)
    close(stats["clipfrac_high"], 1 / 6)  # row 1's one token out of 6
    close(stats["clipfrac_low"], 0.0)
    close(stats["ratio_min"], s0)
    close(stats["ratio_max"], math.exp(0.5))
    close(stats["ratio_mean"], (2 * s0 + math.exp(0.5) + 3 * s2) / 6)


def test_gspo_gradient_equals_the_direct_sequence_ratio():
    # the oracle: differentiate GSPO's objective written with s_i = exp(mean_t (logp - old)) itself
    logp, old, adv, mask = _gspo_batch()
    loss, _ = policy_loss(logp, old, adv, mask, ratio_level="sequence", agg="seq-mean-token-mean")
    loss.backward()
    x = torch.where(mask.bool(), logp.detach(), torch.zeros(3, 3)).requires_grad_()
    o = torch.where(mask.bool(), old, torch.zeros(3, 3))
    s = torch.exp(((x - o) * mask).sum(-1) / mask.sum(-1))  # (B,)
    direct = torch.maximum(-adv * s, -adv * s.clamp(0.8, 1.2)).mean()
    direct.backward()
    torch.testing.assert_close(loss.detach(), direct.detach())
    torch.testing.assert_close(logp.grad, x.grad * mask)
    # unlike the token level, where row 0's two tokens get different gradients -e^0.1 / 6, -e^-0.3 / 6
    logp.grad = None
    policy_loss(logp, old, adv, mask, agg="seq-mean-token-mean")[0].backward()
    torch.testing.assert_close(logp.grad[0, :2], torch.tensor([-math.exp(0.1), -math.exp(-0.3)]) / 6)


def test_gspo_log_ratio_is_capped_at_10():
    # one row, log ratio mean 11, A = -1: rho = e^10 (capped as verl), loss e^10, and the cap stops the gradient
    logp = torch.tensor([[11.0, 11.0]], requires_grad=True)
    loss, _ = policy_loss(logp, torch.zeros(1, 2), torch.tensor([-1.0]), torch.ones(1, 2), ratio_level="sequence")
    close(loss, math.exp(10.0), 1e-2)
    loss.backward()
    assert (logp.grad == 0).all()


# ----------------------------------------------------------------------------- truncated importance sampling

def test_tis_golden():
    # one token per row, logp = old (ratio 1, loss -A); old - rollout = (0, ln 2, ln 5, -ln 2), cap 3:
    # weights min(e^., 3) = (1, 2, 3, 0.5); A = 1 everywhere: losses -(1, 2, 3, 0.5), token-mean -6.5 / 4
    old = torch.tensor([[-1.0], [-1.0], [-1.0], [-1.0]])
    rollout = (old - torch.tensor([[0.0], [LN2], [math.log(5.0)], [-LN2]])).requires_grad_()
    logp = old.clone().requires_grad_()
    adv, mask = torch.ones(4), torch.ones(4, 1)
    loss, stats = policy_loss(logp, old, adv, mask, rollout_logprobs=rollout, tis_cap=3.0)
    close(loss, -6.5 / 4)
    loss.backward()
    # d/dlogp (-A rho w) = -A rho w / N_tok with w a constant: -(1, 2, 3, 0.5) / 4; nothing flows to rollout
    torch.testing.assert_close(logp.grad, -torch.tensor([[1.0], [2.0], [3.0], [0.5]]) / 4)
    assert rollout.grad is None
    close(stats["tis_weight_mean"], 6.5 / 4)
    close(stats["tis_capfrac"], 0.25)
    # the weight multiplies the clipped surrogate: ratio e, A = 1 -> -1.2, times w = 2 -> -2.4, no gradient
    logp = torch.tensor([[0.0]], requires_grad=True)
    loss, _ = policy_loss(logp, torch.tensor([[-1.0]]), torch.ones(1), torch.ones(1, 1),
                          rollout_logprobs=torch.tensor([[-1.0 - LN2]]), tis_cap=3.0)
    close(loss, -2.4)
    loss.backward()
    close(logp.grad[0, 0], 0.0)


def test_tis_with_the_samplers_own_logprobs_changes_nothing():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(3, 4, generator=g).clamp(max=0)
    old = logp + 0.3 * torch.randn(3, 4, generator=g)
    adv, mask = torch.randn(3, generator=g), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    plain, _ = policy_loss(logp, old, adv, mask)
    tis, stats = policy_loss(logp, old, adv, mask, rollout_logprobs=old, tis_cap=2.0)
    torch.testing.assert_close(tis, plain)
    close(stats["tis_weight_mean"], 1.0)
    with pytest.raises(ValueError, match="rollout_logprobs"):
        policy_loss(logp, old, adv, mask, tis_cap=2.0)
    with pytest.raises(ValueError, match=r"rollout_logprobs \(3, 3\)"):
        policy_loss(logp, old, adv, mask, rollout_logprobs=torch.zeros(3, 3), tis_cap=2.0)


# ----------------------------------------------------------------------------- advantage estimators

def test_rloo_golden():
    rewards = [1, 0, 0, 0,  1, 0, 0, 1,  0.375, 0.375, 0.375, 0.375]
    # r_i minus the mean of the other three rewards of its group:
    #   group 1: 1 - 0 = 1;  0 - 1/3 = -1/3 (x3)     group 2: 1 - 1/3 = 2/3;  0 - 2/3 = -2/3     group 3: 0
    adv = group_advantages(rewards, 4, scale="none", estimator="rloo")
    t = 1 / 3
    torch.testing.assert_close(adv, torch.tensor([1, -t, -t, -t, 2 * t, -2 * t, -2 * t, 2 * t, 0, 0, 0, 0]))
    # divided by the group's unbiased std (0.5 and sqrt(1/3)): group 1 (2, -2/3), group 2 +-(2/3) / sqrt(1/3)
    adv = group_advantages(rewards, 4, eps=0.0, estimator="rloo")
    r3 = 2 / math.sqrt(3)
    torch.testing.assert_close(adv, torch.tensor([2, -2 * t, -2 * t, -2 * t, r3, -r3, -r3, r3, 0, 0, 0, 0]))
    # G = 2: r_i - r_j
    torch.testing.assert_close(group_advantages([1.0, 0.25], 2, scale="none", estimator="rloo"),
                               torch.tensor([0.75, -0.75]))


def test_batch_scale_golden():
    rewards = [1, 0,  1, 0,  1, 1,  0, 0]
    # group-centred: (+-.5, +-.5, 0, 0); the batch: mean .5, every deviation +-.5, sum of squares 8 * .25 = 2
    #   population std sqrt(2 / 8) = .5 -> (+-1, +-1, 0, 0);  unbiased sqrt(2 / 7) -> +-.5 / sqrt(2/7) = +-0.935414
    adv = group_advantages(rewards, 2, scale="batch", eps=0.0, unbiased=False)
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, 1.0, -1.0, 0, 0, 0, 0]))
    adv = group_advantages(rewards, 2, scale="batch", eps=0.0)
    b = 0.5 / math.sqrt(2 / 7)
    torch.testing.assert_close(adv, torch.tensor([b, -b, b, -b, 0, 0, 0, 0]))
    # vs scale="group": each mixed group's own std is sqrt(.5) (unbiased) -> +-.7071
    adv = group_advantages(rewards, 2, eps=0.0)
    torch.testing.assert_close(adv[:2], torch.tensor([1.0, -1.0]) * math.sqrt(0.5))
    # RLOO with the batch scale: G / (G - 1) = 2 times the grpo numerator, +-1 / .5 = +-2 (population)
    adv = group_advantages(rewards, 2, scale="batch", eps=0.0, unbiased=False, estimator="rloo")
    torch.testing.assert_close(adv, torch.tensor([2.0, -2.0, 2.0, -2.0, 0, 0, 0, 0]))


def test_constant_groups_stay_exact_zero_in_every_mode():
    # 0.1 and 0.7 have no exact binary form; the batch std is nonzero, yet these groups must be exactly 0
    for estimator in grpo.ADV_ESTIMATORS:
        for scale in grpo.ADV_SCALES:
            for eps in (1e-6, 0.0):
                adv = group_advantages([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 1, 0, 0], 3, scale=scale, eps=eps,
                                       estimator=estimator)
                assert torch.equal(adv[:6], torch.zeros(6)) and (adv[6:] != 0).all(), (estimator, scale, adv)
                assert torch.equal(group_advantages([0.3, 1.0], 1, scale=scale, estimator=estimator), torch.zeros(2))


def test_advantage_defaults_and_errors():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.25])
    torch.testing.assert_close(group_advantages(rewards, 2),
                               group_advantages(rewards, 2, scale="group", estimator="grpo"))
    with pytest.raises(ValueError, match="estimator"):
        group_advantages(rewards, 2, estimator="ppo")
    with pytest.raises(ValueError, match="scale"):
        group_advantages(rewards, 2, scale="global")
    with pytest.raises(ValueError, match="ratio_level"):
        policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1), torch.ones(1, 2), ratio_level="seq")
