"""model/prefix.py: the training forward with each prompt once per group equals the per-row forward (prompt
recomputed in every row) in log-probs and in gradients, on both architectures, with left-padded prompts of
different lengths, zero/one/two images, right-padded responses, a sampled <|image_pad|> id in a response, and
micro-batches that split a group.
Run: .venv/bin/python -m pytest -q tests/test_prefix.py
"""
import pytest
import torch

import sample
import logprobs
from config import Config
from model.prefix import GroupedForward, grouped_hidden
from conftest import STOP, build_tiny, make_prompts  # noqa: E402  (the tiny_vlm kit's plain functions)


def rollouts(net, prompts, G=3, n=10, seed=4):
    ro = sample.generate(net, prompts, group_size=G, max_new_tokens=n, temperature=1.0, stop_token_ids=STOP,
                         seed=seed)
    for name in ("response_ids", "response_mask", "logprobs"):  # out of inference mode, for autograd
        setattr(ro, name, getattr(ro, name).clone())
    return ro


def logprobs_and_grads(net, prompts, ro, rows, shared: bool):
    cfg = Config(model="x", data="x", prompts_per_step=1, mini_batch_prompts=1, device="cpu", dtype="fp32",
                 shared_prefix=shared)
    net.zero_grad(set_to_none=True)
    logp, _, _, mask = logprobs.micro_logprobs(net, prompts, ro, rows, cfg, torch.device("cpu"), 0)
    # a loss that weighs every token differently, so a misplaced gradient cannot cancel out
    w = torch.linspace(0.5, 1.5, mask.numel()).view_as(mask)
    (logp * mask * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return (logp * mask).detach(), grads


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen2_5_vl"])
def test_grouped_equals_per_row(arch):
    net, proc = build_tiny(arch)
    net.train()
    prompts = make_prompts(proc)  # image, text, two images, longer image prompt: lengths differ
    ro = rollouts(net, prompts)
    assert len(set(ro.response_mask.sum(1).tolist())) > 1  # right padding is exercised
    for rows in (list(range(len(ro.prompt_index))),      # the whole step
                 [1, 2, 3, 4],                             # a micro-batch that splits two groups
                 [6, 7, 8]):                               # one group: the prompt's k/v reach the rows by expand
        a, ga = logprobs_and_grads(net, prompts, ro, rows, shared=False)
        b, gb = logprobs_and_grads(net, prompts, ro, rows, shared=True)
        assert (a - b).abs().max() <= 1e-5, rows
        # a parameter that cannot reach the loss (DeepStack after the last layer feeds only image positions'
        # logits) has a zero gradient in one forward and none in the other
        for name in ga.keys() | gb.keys():
            a_, b_ = ga.get(name), gb.get(name)
            a_ = torch.zeros_like(b_) if a_ is None else a_
            b_ = torch.zeros_like(a_) if b_ is None else b_
            assert (a_ - b_).abs().max() <= 1e-5 * (1 + a_.abs().max()), (rows, name)
        assert len(gb) > 10


def test_sampled_image_token_in_a_response_is_text():
    """A policy can sample the <|image_pad|> id: it must stay a text token in both forwards (no image slot)."""
    net, proc = build_tiny("qwen3_vl")
    prompts = make_prompts(proc)
    ro = rollouts(net, prompts, G=2, n=6)
    ro.response_ids[1, 2] = net.config.image_token_id
    ro.response_mask[1, :4] = 1
    a, _ = logprobs_and_grads(net, prompts, ro, [0, 1, 2], shared=False)
    b, _ = logprobs_and_grads(net, prompts, ro, [0, 1, 2], shared=True)
    assert (a - b).abs().max() <= 1e-5


def test_sampler_logprobs_equal_grouped_forward():
    """The PPO ratio is exactly 1 at the first inner step: sampler log-probs == grouped training forward."""
    net, proc = build_tiny("qwen3_vl")
    prompts = make_prompts(proc)
    ro = rollouts(net, prompts, G=4, n=12, seed=9)
    with torch.no_grad():
        cfg = Config(model="x", data="x", prompts_per_step=1, mini_batch_prompts=1, device="cpu", dtype="fp32")
        logp = logprobs.micro_logprobs(net, prompts, ro, list(range(len(ro.prompt_index))), cfg,
                                    torch.device("cpu"), 0)[0]
    R = logp.shape[1]
    diff = (logp - ro.logprobs[:, :R]) * ro.response_mask[:, :R]
    assert diff.abs().max() <= 1e-5


def test_grouped_forward_module_is_the_function():
    net, proc = build_tiny("qwen3_vl")
    prompts = make_prompts(proc)
    ro = rollouts(net, prompts, G=2, n=5)
    batch = logprobs.collate_groups(prompts, ro.prompt_index, ro.response_ids, ro.response_mask, 0, "cpu")
    assert batch["prompt_ids"].shape[0] == len(prompts) and batch["row_prompt"].tolist() == ro.prompt_index.tolist()
    with torch.no_grad():
        (a, za), (b, zb) = GroupedForward(net)(**batch), grouped_hidden(net, **batch)
        assert torch.equal(a, b) and float(za) == float(zb) == 0.0


def test_activation_checkpointing_keeps_grouped_gradients():
    """The prompt pass's keys/values leave the checkpointed blocks by side effect: recomputation must still give
    the same gradients as the plain grouped forward."""
    import copy

    from torch.distributed._composable import checkpoint
    net, proc = build_tiny("qwen3_vl")
    net.train()
    prompts = make_prompts(proc)
    ro = rollouts(net, prompts, G=2, n=8)
    rows = list(range(len(ro.prompt_index)))
    ckpt = copy.deepcopy(net)
    for block in ckpt.decoder_blocks():
        checkpoint(block)
    a, ga = logprobs_and_grads(net, prompts, ro, rows, shared=True)
    b, gb = logprobs_and_grads(ckpt, prompts, ro, rows, shared=True)
    assert (a - b).abs().max() <= 1e-6
    for name in ga:
        assert (ga[name] - gb[name]).abs().max() <= 1e-6 * (1 + ga[name].abs().max()), name


@pytest.mark.parametrize("shared,dtype", [(True, "fp32"), (False, "fp32"), (True, "bf16"), (False, "bf16")])
def test_training_forward_keeps_one_attention_mask_for_all_layers(shared, dtype):
    """Autograd keeps what the backward needs. The shared-prefix forward keeps no dense mask at all (padding is cut
    off, the causal pattern is SDPA's own); the per-row forward's mask of a padded batch is kept once per forward
    (model/decoder.KeyMask), not once per layer (SDPA's own bool -> float conversion in every layer kept L copies
    of a B x T x T mask), also under bf16 autocast (where SDPA casts a mask of another dtype per layer)."""
    net, proc = build_tiny("qwen3_vl")
    prompts = make_prompts(proc)
    ro = rollouts(net, prompts)
    cfg = Config(model="x", data="x", prompts_per_step=1, mini_batch_prompts=1, device="cpu", dtype=dtype,
                 shared_prefix=shared)
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logprobs.micro_logprobs(net, prompts, ro, list(range(len(ro.prompt_index))), cfg, torch.device("cpu"), 0)
    # the additive masks: floating (B, 1, Tq, Tk) tensors holding -inf
    masks = [t for t in saved if t.dim() == 4 and t.shape[1] == 1 and t.is_floating_point() and bool(t.isinf().any())]
    layers = net.config.text.num_hidden_layers
    if shared:
        assert not masks
        return
    assert len(masks) == layers  # every layer's SDPA saved one ...
    assert len({t.untyped_storage().data_ptr() for t in masks}) == 1  # ... and they are the same tensor
    assert masks[0].untyped_storage().nbytes() % 16 == 0 and masks[0].stride(-2) % 8 == 0  # aligned rows


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen2_5_vl"])
def test_grouped_forward_without_masks_equals_the_masked_one(arch):
    """Today's shared-prefix forward (left padding cut off, lower-right causal attention with grouped keys, no dense
    mask, no repeated keys) equals the masked one it replaced (tests/oracle.py) in logits and in every gradient."""
    from logprobs import token_logprobs
    from oracle import masked_grouped_logits
    from model.prefix import grouped_logits
    net, proc = build_tiny(arch)
    net.train()
    prompts = make_prompts(proc)
    ro = rollouts(net, prompts)
    mask = ro.response_mask
    batch = logprobs.collate_groups(prompts, ro.prompt_index, ro.response_ids, mask, 0, "cpu")
    w = torch.linspace(0.5, 1.5, mask.numel()).view_as(mask)
    out = []
    for forward in (grouped_logits, masked_grouped_logits):
        net.zero_grad(set_to_none=True)
        logits, anchor = forward(net, **batch)
        ((token_logprobs(logits, ro.response_ids) * mask * w).sum() + anchor).backward()
        out.append((logits.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = out
    assert ((a - b).abs() * mask[..., None]).max() <= 1e-5  # padding positions predict nothing: any finite value
    assert ga.keys() == gb.keys() and len(ga) > 10
    for name in ga:
        assert (ga[name] - gb[name]).abs().max() <= 1e-5 * (1 + ga[name].abs().max()), name


def test_rows_need_not_come_grouped_by_prompt():
    """micro_logprobs takes rows in any order (a micro-batch packed by length mixes prompts): the grouped forward
    sees them ordered by prompt, and the log-probs come back in the order asked."""
    net, proc = build_tiny("qwen3_vl")
    prompts = make_prompts(proc)
    ro = rollouts(net, prompts)
    cfg = Config(model="x", data="x", prompts_per_step=1, mini_batch_prompts=1, device="cpu", dtype="fp32")
    rows = [7, 0, 10, 3, 1]
    with torch.no_grad():
        mixed = logprobs.micro_logprobs(net, prompts, ro, rows, cfg, torch.device("cpu"), 0)
        ordered = logprobs.micro_logprobs(net, prompts, ro, sorted(rows), cfg, torch.device("cpu"), 0)
    back = [sorted(rows).index(r) for r in rows]
    assert (mixed[0] - ordered[0][back]).abs().max() <= 1e-6
    assert torch.equal(mixed[2], ordered[2][back])
