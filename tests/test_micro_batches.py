"""Micro-batches packed by tokens (logprobs.micro_batches, --micro_batch_tokens): the loss's gradient over a mini-batch
is the fixed-row-count one (the normalizer is the mini-batch's token count, however the rows are cut), and on a skewed
length spread far fewer padded positions are computed. Tiny random Qwen3-VL, fp32, CPU.
Run: .venv/bin/python -m pytest -q tests/test_micro_batches.py
"""
import random

import torch

import grpo
import logprobs
from config import Config
from conftest import build_tiny, make_prompts
from rollout.engine import Rollout


def skewed_rollout(prompts, G=4, seed=0, vocab=300) -> Rollout:
    """Rows of every prompt with short and long responses (3..6 or 40..60 tokens), as thinking models give."""
    rng = random.Random(seed)
    lengths = [rng.randint(3, 6) if rng.random() < 0.6 else rng.randint(40, 60) for _ in range(len(prompts) * G)]
    R = max(lengths)
    mask = (torch.arange(R)[None] < torch.tensor(lengths)[:, None]).float()
    ids = torch.randint(50, vocab, (len(lengths), R), generator=torch.Generator().manual_seed(seed)) * mask.long()
    old = -torch.rand(len(lengths), R, generator=torch.Generator().manual_seed(seed + 1)) * mask
    return Rollout(prompt_index=torch.arange(len(prompts)).repeat_interleave(G), response_ids=ids,
                   response_mask=mask, logprobs=old, finish_reason=["stop"] * len(lengths))


def gradient(net, prompts, ro, cfg, advantages):
    """The token-mean clipped loss of the whole mini-batch, accumulated micro-batch by micro-batch as train.py does."""
    rows = list(range(ro.response_ids.shape[0]))
    micro = logprobs.micro_batches(rows, ro, prompts, cfg)
    normalizer = float(ro.response_mask.sum())
    net.zero_grad(set_to_none=True)
    for mb in micro:
        logp, _, _, mask = logprobs.micro_logprobs(net, prompts, ro, mb, cfg, torch.device("cpu"), 0)
        R = mask.shape[1]
        loss, _ = grpo.policy_loss(logp, ro.logprobs[mb, :R], advantages[mb], mask, loss_normalizer=normalizer)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return grads, micro


def test_packing_by_tokens_keeps_the_gradient_and_cuts_the_padding():
    net, proc = build_tiny("qwen3_vl")
    prompts = make_prompts(proc)
    ro = skewed_rollout(prompts)
    advantages = torch.randn(ro.response_ids.shape[0], generator=torch.Generator().manual_seed(3))
    fixed = Config(model="x", data="x", prompts_per_step=1, mini_batch_prompts=1, device="cpu", dtype="fp32",
                   micro_batch_size=4)
    longest_prompt = max(p["input_ids"].numel() for p in prompts)
    packed = Config(**{**fixed.to_dict(), "micro_batch_tokens": 4 * (longest_prompt + 30)})
    g_fixed, micro_fixed = gradient(net, prompts, ro, fixed, advantages)
    g_packed, micro_packed = gradient(net, prompts, ro, packed, advantages)
    assert sorted(r for mb in micro_packed for r in mb) == list(range(ro.response_ids.shape[0]))  # every row once
    assert [len(mb) for mb in micro_packed] != [len(mb) for mb in micro_fixed]  # really another cut
    assert g_fixed.keys() == g_packed.keys() and len(g_fixed) > 10
    for name in g_fixed:
        assert (g_fixed[name] - g_packed[name]).abs().max() <= 1e-6 * (1 + g_fixed[name].abs().max()), name
    computed_fixed, real = logprobs.padded_positions(micro_fixed, ro)
    computed_packed, real_packed = logprobs.padded_positions(micro_packed, ro)
    assert real == real_packed == float(ro.response_mask.sum()) and computed_packed >= real
    half, _ = logprobs.padded_positions(micro_fixed[:2], ro)  # a part of the rows: its own real tokens only
    assert half >= logprobs.padded_positions(micro_fixed[:2], ro)[1]
    assert (computed_fixed - real) >= 2 * (computed_packed - real)  # >= 2x fewer padded positions
    for mb in micro_packed:  # each micro-batch within the budget, unless a row alone exceeds it
        longest = max(prompts[int(ro.prompt_index[r])]["input_ids"].numel() for r in mb) + \
            int(ro.response_mask[mb].sum(1).max())
        assert len(mb) == 1 or len(mb) * longest <= packed.micro_batch_tokens


def test_a_row_longer_than_the_budget_goes_alone():
    net, proc = build_tiny("qwen3_vl")
    prompts = make_prompts(proc)
    ro = skewed_rollout(prompts, G=2)
    cfg = Config(model="x", data="x", prompts_per_step=1, mini_batch_prompts=1, micro_batch_tokens=10)
    micro = logprobs.micro_batches(list(range(ro.response_ids.shape[0])), ro, prompts, cfg)
    assert all(len(mb) == 1 for mb in micro) and len(micro) == ro.response_ids.shape[0]
