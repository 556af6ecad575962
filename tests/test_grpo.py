"""grpo.py pinned by hand-worked numbers, by the naive versions of its fast paths, and by invariances.
Run: `.venv/bin/python -m pytest -q tests/test_grpo.py` (a few seconds on CPU)."""
import math

import pytest
import torch

import grpo
from grpo import agg_normalizer, group_advantages, kl_penalty, policy_loss
from logprobs import token_entropy, token_logprobs

E = math.e
LN2 = math.log(2.0)


def close(x, expected, tol=1e-6):
    x, expected = float(torch.as_tensor(x).detach()), float(expected)
    assert x == pytest.approx(expected, abs=tol), (x, expected)


# ----------------------------------------------------------------------------- advantages

def test_group_advantages_golden_unbiased_and_population():
    rewards = [1, 0, 0, 0,  1, 0, 0, 1,  0.375, 0.375, 0.375, 0.375]
    # group 1: mean .25, deviations (.75, -.25, -.25, -.25), sum of squares .75
    #   unbiased std sqrt(.75 / 3) = .5           -> (1.5, -.5, -.5, -.5)
    #   population std sqrt(.75 / 4) = sqrt(3)/4  -> (sqrt 3, -1/sqrt 3, ...)
    # group 2: mean .5, deviations +-.5, sum of squares 1
    #   unbiased std sqrt(1/3) -> +-sqrt(3)/2;  population std .5 -> +-1
    # group 3: constant -> exactly 0
    s3 = math.sqrt(3)
    adv = group_advantages(rewards, 4, eps=0.0, unbiased=True)
    assert adv.dtype == torch.float32 and adv.shape == (12,)
    torch.testing.assert_close(adv, torch.tensor([1.5, -.5, -.5, -.5, s3 / 2, -s3 / 2, -s3 / 2, s3 / 2, 0, 0, 0, 0]))
    adv = group_advantages(rewards, 4, eps=0.0, unbiased=False)
    torch.testing.assert_close(adv, torch.tensor([s3, -1 / s3, -1 / s3, -1 / s3, 1, -1, -1, 1, 0, 0, 0, 0]))
    # the default eps sits in the denominator: .5 / (.5 + 1e-6)
    adv = group_advantages([1, 0, 0, 1], 4, unbiased=False)
    close(adv[0], 0.5 / (0.5 + 1e-6), 1e-7)  # = 0.999998, 30 float32 ulps below 1
    # Dr. GRPO: no std, just r - mean
    torch.testing.assert_close(group_advantages(rewards[:4], 4, scale="none"), torch.tensor([.75, -.25, -.25, -.25]))


def test_constant_groups_give_exact_zero():
    # 0.1 has no exact binary form: the group mean is off by one ulp, and 1e-17 / (std + eps) is not 0
    for scale in ("group", "none"):
        for eps in (1e-6, 0.0):
            adv = group_advantages([0.1, 0.1, 0.1, 0.7, 0.7, 0.7], 3, scale=scale, eps=eps)
            assert torch.equal(adv, torch.zeros(6)), adv
    # group_size 1: unbiased std is undefined; a single sample carries no relative signal
    assert torch.equal(group_advantages([0.3, 1.0], 1), torch.zeros(2))
    assert torch.equal(group_advantages(torch.tensor([0.0, 0.0]), 2, unbiased=True), torch.zeros(2))


def test_group_advantages_errors_name_shapes():
    with pytest.raises(ValueError, match=r"10 rewards.*group_size=4"):
        group_advantages(list(range(10)), 4)
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        group_advantages(torch.zeros(2, 3), 3)
    with pytest.raises(ValueError, match="rows \\[1\\]"):
        group_advantages([0.0, float("nan")], 2)


# ----------------------------------------------------------------------------- KL estimators

@pytest.mark.parametrize("kind,value_up,grad_up,value_down,grad_down", [
    # up: logp - ref = +ln2 (logp = ln .5, ref = ln .25); down: logp - ref = -ln2 (swapped)
    ("k1", LN2, 1.0, -LN2, 1.0),
    ("k2", LN2 ** 2 / 2, LN2, LN2 ** 2 / 2, -LN2),  # (x^2)/2, grad x
    ("abs", LN2, 1.0, LN2, -1.0),
    # k3 = e^d - d - 1 with d = ref - logp; grad wrt logp = 1 - e^d
    #   up: d = -ln2: .5 + ln2 - 1 = .193147, grad .5;  down: d = ln2: 2 - ln2 - 1 = .306853, grad -1
    ("k3", 0.5 + LN2 - 1, 0.5, 1 - LN2, -1.0),
])
def test_kl_estimators_golden_values_and_grads(kind, value_up, grad_up, value_down, grad_down):
    logp = torch.tensor([math.log(0.5), math.log(0.25)], requires_grad=True)
    ref = torch.tensor([math.log(0.25), math.log(0.5)])
    k = kl_penalty(logp, ref, kind)
    k.sum().backward()
    close(k[0], value_up)
    close(k[1], value_down)
    close(logp.grad[0], grad_up)
    close(logp.grad[1], grad_down)


def test_k3_clamps():
    logp = torch.zeros(4, requires_grad=True)
    ref = torch.tensor([2.5, 3.0, 30.0, -30.0])
    k = kl_penalty(logp, ref, "k3")
    k.sum().backward()
    # 2.5: e^2.5 - 3.5 = 8.682494, grad 1 - e^2.5;  3: e^3 - 4 = 16.09 -> clamped to 10, no grad
    # 30: log ratio clamped to 20, value to 10;  -30: -20 -> e^-20 + 19 -> 10
    torch.testing.assert_close(k.detach(), torch.tensor([math.exp(2.5) - 3.5, 10.0, 10.0, 10.0]))
    torch.testing.assert_close(logp.grad, torch.tensor([1 - math.exp(2.5), 0.0, 0.0, 0.0]))


def test_kl_expected_gradients_k3_is_not_the_true_kl_gradient():
    # policy pi = softmax(theta) = (.5, .5) at theta = 0; reference q = (.25, .75). Exact expectations over
    # the sampled token x ~ pi (weights pi detached: the loss treats tokens as fixed samples).
    #   grad_theta log pi(x) = e_x - pi
    #   E[grad k3] = sum_x pi(x) (1 - q(x)/pi(x)) (e_x - pi) = pi - q = (.25, -.25) = grad KL(q || pi)
    #   true grad KL(pi || q) = sum_x pi(x) log(pi(x)/q(x)) (e_x - pi) = (ln3 / 4, -ln3 / 4) = E[grad k2]
    #   E[grad k1] = E[grad log pi] = 0;  values: E[k1] = E[k3] = KL(pi || q) = ln(4/3) / 2
    q = torch.tensor([0.25, 0.75])
    expected_grad = {"k3": [0.25, -0.25], "k2": [math.log(3) / 4, -math.log(3) / 4], "k1": [0.0, 0.0]}
    for kind, grad in expected_grad.items():
        theta = torch.zeros(2, requires_grad=True)
        logp = torch.log_softmax(theta, dim=0)
        expectation = (logp.exp().detach() * kl_penalty(logp, q.log(), kind)).sum()
        expectation.backward()
        torch.testing.assert_close(theta.grad, torch.tensor(grad), rtol=0, atol=1e-6)
        if kind in ("k1", "k3"):
            close(expectation, math.log(4 / 3) / 2)
    # and the true gradient, by autograd through the exact KL
    theta = torch.zeros(2, requires_grad=True)
    p = torch.softmax(theta, dim=0)
    (p * (p.log() - q.log())).sum().backward()
    torch.testing.assert_close(theta.grad, torch.tensor(expected_grad["k2"]), rtol=0, atol=1e-6)


def test_kl_penalty_errors():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        kl_penalty(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="kind"):
        kl_penalty(torch.zeros(2), torch.zeros(2), "low_var")


# ----------------------------------------------------------------------------- the clipped loss

def _loss_with_grad(log_ratio, adv, **kw):
    """policy_loss on rows of one token each; returns (loss, stats, d loss / d logp)."""
    old = torch.zeros(len(log_ratio), 1)
    logp = torch.tensor(log_ratio, dtype=torch.float32).view(-1, 1).requires_grad_()
    loss, stats = policy_loss(logp, old, torch.tensor(adv, dtype=torch.float32), torch.ones_like(old), **kw)
    loss.backward()
    return loss, stats, logp.grad.flatten()


def test_ratio_clipping_golden():
    # rho = e (log ratio 1) or 1/e (log ratio -1), A = +-1, clip 0.2:
    #   A=+1, rho=e:   -min(e, 1.2)             = -1.2   clipped high, no gradient
    #   A=-1, rho=1/e: max(1/e, 0.8)            =  0.8   clipped low, no gradient
    #   A=+1, rho=1/e: -1/e (ratio below the clip range, but min keeps it)  grad -A rho = -1/e
    #   A=-1, rho=e:   e    (pessimistic side, unclipped)                    grad e
    loss, stats, grad = _loss_with_grad([1.0, -1.0, -1.0, 1.0], [1.0, -1.0, 1.0, -1.0])
    close(loss, (-1.2 + 0.8 - 1 / E + E) / 4)  # token-mean over 4 tokens
    torch.testing.assert_close(grad, torch.tensor([0.0, 0.0, -1 / E, E]) / 4)
    close(stats["clipfrac_high"], 0.25)
    close(stats["clipfrac_low"], 0.25)
    close(stats["clipfrac_dual"], 0.0)
    close(stats["ratio_mean"], math.cosh(1.0))  # (2e + 2/e) / 4
    close(stats["ratio_min"], 1 / E)
    close(stats["ratio_max"], E)
    close(stats["ppo_kl"], 0.0)  # mean(old - logp) = mean(-1, 1, 1, -1)
    close(stats["n_tokens"], 4)
    assert all(v.dim() == 0 and not v.requires_grad and v.dtype == torch.float32 for v in stats.values())
    # clip-higher (DAPO): separate upper bound
    loss, _, _ = _loss_with_grad([1.0], [1.0], clip_high=0.28)
    close(loss, -1.28)
    loss, _, _ = _loss_with_grad([-1.0], [-1.0], clip_low=0.1)
    close(loss, 0.9)


def test_dual_clip_golden():
    # dual clip c = 3 caps the loss of negative-advantage tokens at -A * c:
    #   A=-1, rho=e^2 = 7.389: max(7.389, 1.2) = 7.389 -> min(7.389, 3) = 3, no gradient
    #   A=-1, rho=e   = 2.718: below c, unchanged e, grad e
    #   A=+1, rho=e^2:         positive A untouched: -1.2
    #   A=-2, rho=e^2:         min(14.78, 6) = 6
    loss, stats, grad = _loss_with_grad([2.0, 1.0, 2.0, 2.0], [-1.0, -1.0, 1.0, -2.0], dual_clip=3.0)
    close(loss, (3.0 + E - 1.2 + 6.0) / 4)
    torch.testing.assert_close(grad, torch.tensor([0.0, E, 0.0, 0.0]) / 4)
    close(stats["clipfrac_dual"], 0.5)
    close(stats["clipfrac_high"], 0.25)
    # without dual clip the first token costs rho = e^2
    loss, _, grad = _loss_with_grad([2.0], [-1.0])
    close(loss, math.exp(2.0))
    close(grad[0], math.exp(2.0))


def _ragged():
    # 3 sequences, T = 3, lengths 3, 1, 0; ratio 1 so the per-token loss is -A
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    adv = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [9.0, 9.0, 9.0]])  # the 9s are padding
    logp = torch.zeros(3, 3)
    # padding may hold garbage; it must not reach the loss or the gradient
    logp[mask == 0] = float("nan")
    old = torch.zeros(3, 3)
    old[mask == 0] = -float("inf")
    ref = torch.where(mask.bool(), logp - 1.0, torch.full_like(logp, float("inf")))  # k1 = 1 per token
    return logp, old, adv, mask, ref


@pytest.mark.parametrize("agg,normalizer,expected_pg,expected_kl", [
    # per-token losses: row 0 (-1, -2, -3), row 1 (-4), row 2 empty
    ("token-mean", None, -10 / 4, 1.0),  # sum over 4 tokens / 4
    ("token-mean", 8, -10 / 8, 4 / 8),  # this micro-batch is half the global tokens
    ("seq-mean-token-mean", None, (-2 - 4) / 2, 1.0),  # row means -2, -4; empty row not counted
    ("seq-mean-token-mean", 4, (-2 - 4) / 4, 2 / 4),
    ("seq-mean-token-sum-norm", None, (-6 / 4 - 4 / 4) / 2, (3 / 4 + 1 / 4) / 2),  # C = 4
])
def test_aggregation_modes_golden_on_ragged_masks(agg, normalizer, expected_pg, expected_kl):
    logp, old, adv, mask, ref = _ragged()
    logp.requires_grad_()
    loss, stats = policy_loss(logp, old, adv, mask, ref_logprobs=ref, kl_coef=0.5, kl_kind="k1", agg=agg,
                              loss_normalizer=normalizer, norm_constant=4)
    close(stats["pg_loss"], expected_pg)
    close(stats["kl"], expected_kl)  # the KL term is aggregated the same way
    close(loss, expected_pg + 0.5 * expected_kl)
    loss.backward()
    assert torch.isfinite(logp.grad).all() and (logp.grad[mask == 0] == 0).all()
    assert agg_normalizer(mask, agg) == (4 if agg == "token-mean" else 2)


def test_identical_policies_ratio_one_kl_zero():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(3, 5, generator=g).clamp(max=0).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    adv = torch.tensor([0.5, -1.0, 2.0])
    for kind in grpo.KL_KINDS:
        logp.grad = None
        loss, stats = policy_loss(logp, logp.detach(), adv, mask, ref_logprobs=logp.detach(), kl_coef=0.01,
                                  kl_kind=kind, dual_clip=3.0)
        close(stats["kl"], 0.0)
        for k in ("ratio_mean", "ratio_min", "ratio_max"):
            close(stats[k], 1.0)
        for k in ("clipfrac_low", "clipfrac_high", "clipfrac_dual", "ppo_kl"):
            close(stats[k], 0.0)
        close(loss, -(5 * 0.5 - 2 * 1.0 + 2.0) / 8)  # -token-mean(A)
        loss.backward()
        # the plain policy gradient -A / N_tok; the KL gradient at ref == policy is 0 for k2, k3 (and abs,
        # whose subgradient at 0 torch takes as 0) but kl_coef / N_tok for k1, whose gradient is always 1
        expected = -adv[:, None].expand(3, 5) / 8 + (0.01 / 8 if kind == "k1" else 0.0)
        torch.testing.assert_close(logp.grad, torch.where(mask.bool(), expected, torch.zeros(3, 5)))


def test_entropy_stat_and_bonus():
    # uniform logits over V = 4: H = ln 4 = 1.386294 at every position, and dH/dlogits = 0 there;
    # one sharper row: logits (2, 0, 0, 0) -> p = (e^2, 1, 1, 1) / (e^2 + 3), H = ln(e^2 + 3) - 2 e^2 / (e^2 + 3)
    logits = torch.zeros(2, 3, 4)
    logits[1, 0, 0] = 2.0
    logits.requires_grad_()
    h_sharp = math.log(E ** 2 + 3) - 2 * E ** 2 / (E ** 2 + 3)  # 0.958271
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    logp = torch.zeros(2, 3)  # ratio 1 and A = 0: the policy term is 0
    loss, stats = policy_loss(logp, logp, torch.zeros(2), mask, entropy=token_entropy(logits), entropy_coef=0.1)
    close(stats["entropy"], (3 * math.log(4) + h_sharp) / 4)
    close(loss, -0.1 * (3 * math.log(4) + h_sharp) / 4)
    loss.backward()
    assert (logits.grad[0] == 0).all() and logits.grad[1, 0].abs().max() > 0
    # entropy_coef = 0: a stat only, no graph through it
    _, stats = policy_loss(logp, logp, torch.zeros(2), mask, entropy=token_entropy(logits).detach())
    close(stats["entropy"], (3 * math.log(4) + h_sharp) / 4)


def test_empty_micro_batch_is_zero_not_nan():
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.zeros(2, 3)
    for agg in grpo.AGG_MODES:
        loss, stats = policy_loss(logp, logp.detach() + 1, torch.ones(2), mask, ref_logprobs=logp.detach(),
                                  kl_coef=0.01, agg=agg, norm_constant=3, loss_normalizer=5)
        assert float(loss.detach()) == 0.0
        assert all(math.isfinite(float(v)) for v in stats.values())
        close(stats["ratio_min"], 1.0)
        close(stats["n_tokens"], 0.0)


# ----------------------------------------------------------------------------- micro-batches and ranks

def _setup_batch():
    """A tiny 'policy' (logits = h @ W) on 4 ragged sequences, with old / ref policies nearby."""
    g = torch.Generator().manual_seed(0)
    B, T, D, V = 4, 6, 8, 11
    h = torch.randn(B, T, D, generator=g)
    W = torch.randn(D, V, generator=g)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.arange(T)[None] < torch.tensor([6, 2, 5, 1])[:, None]).long()
    with torch.no_grad():
        lp = token_logprobs(h @ W, tokens)
    old = lp + 0.3 * torch.randn(B, T, generator=g)
    ref = lp + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    return h, W, tokens, mask, old, ref, adv


def _grad(agg, micro_batch, normalizer):
    """Sum of the micro-batch losses and its gradient w.r.t. W."""
    h, W, tokens, mask, old, ref, adv = _setup_batch()
    W.requires_grad_()
    total, clipped = 0.0, 0.0
    for s in range(0, 4, micro_batch):
        rows = slice(s, s + micro_batch)
        logp = token_logprobs(h[rows] @ W, tokens[rows], chunk_size=4)
        loss, stats = policy_loss(logp, old[rows], adv[rows], mask[rows], clip_high=0.28, dual_clip=3.0,
                                  ref_logprobs=ref[rows], kl_coef=0.01, agg=agg,
                                  loss_normalizer=normalizer(mask[rows]), norm_constant=6)
        loss.backward()
        total += loss.detach()
        clipped += stats["clipfrac_low"] + stats["clipfrac_high"] + stats["clipfrac_dual"]
    assert clipped > 0  # the case covers clipped tokens
    return total, W.grad


@pytest.mark.parametrize("agg", grpo.AGG_MODES)
def test_micro_batch_gradients_sum_to_the_full_batch_gradient(agg):
    _, _, _, mask, _, _, _ = _setup_batch()
    full_loss, full_grad = _grad(agg, 4, lambda m: None)  # one call: its own counts are the global ones
    # the caller's recipe: sum agg_normalizer over every micro-batch (and, with ranks, all-reduce SUM)
    global_n = sum(agg_normalizer(mask[s:s + 1], agg) for s in range(4))
    for micro_batch in (1, 2, 4):  # micro-batches on one rank and shards on W ranks are the same sum
        loss, grad = _grad(agg, micro_batch, lambda m: global_n)
        close(loss, full_loss)
        torch.testing.assert_close(grad, full_grad, rtol=0, atol=1e-6)


def test_without_the_global_normalizer_micro_batching_changes_the_gradient():
    # per-micro-batch token means averaged over 2 micro-batches (8 and 6 tokens) weigh tokens unequally
    _, full_grad = _grad("token-mean", 4, lambda m: None)
    _, grad = _grad("token-mean", 2, lambda m: 2 * agg_normalizer(m, "token-mean"))
    assert (grad - full_grad).abs().max() > 1e-3


# ----------------------------------------------------------------------------- errors

def test_policy_loss_errors_name_shapes():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"response_mask \(2, 4\)"):
        policy_loss(z, z, torch.zeros(2), torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"ref_logprobs \(3, 3\)"):
        policy_loss(z, z, torch.zeros(2), torch.ones(2, 3), ref_logprobs=torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"advantages.*\(3,\)"):
        policy_loss(z, z, torch.zeros(3), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"entropy \(2, 4\)"):
        policy_loss(z, z, torch.zeros(2), torch.ones(2, 3), entropy=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="norm_constant"):
        policy_loss(z, z, torch.zeros(2), torch.ones(2, 3), agg="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(z, z, torch.zeros(2), torch.ones(2, 3), kl_coef=0.01)
    with pytest.raises(ValueError, match="agg"):
        policy_loss(z, z, torch.zeros(2), torch.ones(2, 3), agg="seq-mean")
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(z, z, torch.zeros(2), torch.ones(2, 3), dual_clip=0.5)
    with pytest.raises(ValueError, match="entropy_coef"):
        policy_loss(z, z, torch.zeros(2), torch.ones(2, 3), entropy_coef=0.01)
