"""rollout/engine.py on tiny random Qwen3-VL / Qwen2.5-VL models (fp32, CPU): the engine equals the slow obvious
sampler (tests/oracle.py) in tokens and log-probs, with images, uneven prompts, rows stopping early, bucketed shapes
and small KV budgets (continuous batching, preemption); samples do not depend on the batch; one state serves every
call. The step itself: test_engine_step.py; the weights it reads: test_rollout_weights.py; GPU: test_engine_gpu.py.
Run: .venv/bin/python -m pytest -q tests/test_engine*.py
"""
import pytest
import torch

import logprobs
from oracle import oracle_generate, reference_generate
from model.kv_cache import KVCache
from rollout.engine import BLOCK_SIZE, Engine

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu.sh runs it)")


@pytest.fixture(scope="module", params=["qwen3_vl", "qwen2_5_vl"])
def arch(request, tiny_vlm):
    net, proc = tiny_vlm.build(request.param)
    return net, tiny_vlm.prompts(proc)


@pytest.fixture(scope="module")
def tiny(tiny_vlm):
    net, proc = tiny_vlm.build("qwen3_vl")
    return net, tiny_vlm.prompts(proc)


def rows_of(ro, r):
    return ro.response_ids[r][ro.response_mask[r].bool()].tolist()


def assert_same_rollout(got, want, tol=1e-5):
    assert torch.equal(got.response_ids, want.response_ids)
    assert torch.equal(got.response_mask, want.response_mask)
    assert got.finish_reason == want.finish_reason
    assert (got.logprobs - want.logprobs).abs().max() <= tol


# ----------------------------------------------------------------------------- parity with the oracles

@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.7, 0.9, 50), (0.0, 1.0, 0)])
@pytest.mark.parametrize("buckets,check_every", [(False, 8), (True, 3)])
@pytest.mark.parametrize("store", ["reserved", "paged"])
def test_engine_equals_oracle(arch, tiny_vlm, temperature, top_p, top_k, buckets, check_every, store):
    """Same tokens, masks, finish reasons and log-probs as one plain KVCache per row with host randomness; with
    exact shapes, and with rows and response lengths rounded up to buckets (more masked keys, more rows); with every
    row's tokens reserved (no budget) and with pages (a budget that holds everything)."""
    net, prompts = arch
    kw = dict(group_size=3, max_new_tokens=12, temperature=temperature, top_p=top_p, top_k=top_k,
              stop_token_ids=tiny_vlm.STOP, seed=5)
    want = oracle_generate(net, prompts, **kw)
    assert len(set(want.response_mask.sum(1).tolist())) > 1  # rows stop at different steps
    got = Engine(net, buckets=buckets, check_every=check_every,
                 kv_budget_bytes=None if store == "reserved" else 1 << 30).generate(prompts, **kw)
    assert got.stats["kv_store"] == store
    assert_same_rollout(got, want)
    assert got.prompt_index.tolist() == [i for i in range(4) for _ in range(3)]


def test_greedy_equals_cache_free_reference(arch):
    net, prompts = arch
    stop = (reference_generate(net, prompts[1:2], max_new_tokens=5)[0][4],)  # text prompt 1 emits it at step 5
    ref = reference_generate(net, prompts, max_new_tokens=10, stop_token_ids=stop)
    assert len({len(r) for r in ref}) > 1
    ro = Engine(net).generate(prompts, group_size=2, max_new_tokens=10, temperature=0.0, stop_token_ids=stop)
    for r in range(8):
        assert rows_of(ro, r) == ref[r // 2], f"row {r}"
        assert ro.finish_reason[r] == ("stop" if ref[r // 2][-1] in stop else "length")


def training_logprobs(net, prompts, ro, temperature):
    """The trainer's own recomputation: [left-padded prompt | right-padded response] through logprobs.collate."""
    per_row = [prompts[int(i)] for i in ro.prompt_index]
    batch = logprobs.collate(per_row, ro.response_ids, ro.response_mask, 0, "cpu", net.rope_index,
                          net.config.image_token_id)
    with torch.no_grad():
        logp, _ = logprobs.response_logprobs(net, batch, ro.response_ids, temperature)
    return logp * ro.response_mask


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.7, 0.9, 50), (0.0, 1.0, 0)])
def test_logprobs_equal_training_forward(arch, tiny_vlm, temperature, top_p, top_k):
    net, prompts = arch
    ro = Engine(net).generate(prompts, group_size=3, max_new_tokens=10, temperature=temperature, top_p=top_p,
                              top_k=top_k, stop_token_ids=tiny_vlm.STOP, seed=5)
    assert ro.logprobs.dtype == torch.float32 and len(set(ro.response_mask.sum(1).tolist())) > 1
    want = training_logprobs(net, prompts, ro, temperature or 1.0)  # greedy: log-softmax of the raw logits
    assert (ro.logprobs - want).abs().max() <= 1e-5
    assert bool((ro.logprobs[ro.response_mask == 0] == 0).all())


# ----------------------------------------------------------------------------- budgets and continuous batching

def budget_for(eng, prompts, blocks: int) -> int:
    """A KV budget whose store holds `blocks` usable blocks (fp32), with the prefill's share set aside."""
    block = eng.block_bytes(torch.float32)
    longest = max(p["input_ids"].numel() for p in prompts)
    prefill = eng.prefill_bytes(1, longest)
    total = (blocks + 1) * block + prefill
    return max(total, (blocks + 1) * block * 8 // 7 + block)


@pytest.mark.parametrize("buckets", [False, True])
@pytest.mark.parametrize("blocks", [13, 18, 26])
def test_kv_budget_equals_unlimited_and_holds(tiny, tiny_vlm, buckets, blocks):
    """Budgets from one group's worth of blocks up: prompts wait, are admitted as blocks free up, live groups move
    down; tokens and log-probs equal an unlimited run, and the KV held never exceeds the budget."""
    net, prompts = tiny
    kw = dict(group_size=3, max_new_tokens=40, temperature=1.0, stop_token_ids=tiny_vlm.STOP[:8], seed=5)
    want = Engine(net).generate(prompts, **kw)
    eng = Engine(net, buckets=buckets, check_every=2)
    eng.kv_budget_bytes = budget = budget_for(eng, prompts, blocks)
    got = eng.generate(prompts, **kw)
    assert_same_rollout(got, want)
    assert got.stats["kv_peak_bytes"] <= budget and got.stats["kv_cache_bytes"] <= budget
    block = eng.block_bytes(torch.float32)
    everything = sum(-(-p["input_ids"].numel() // BLOCK_SIZE) + 3 * -(-40 // BLOCK_SIZE) for p in prompts)
    assert got.stats["kv_held_peak_bytes"] <= got.stats["kv_cache_bytes"] < everything * block  # it mattered


@pytest.mark.parametrize("arch_name", ["qwen3_vl", "qwen2_5_vl"])
def test_preemption_keeps_every_sample(tiny_vlm, arch_name):
    """A budget so tight that growing rows run out of blocks: the newest group is preempted (its blocks freed) and
    recomputed later from its prompt with the same random numbers. Tokens equal an unlimited run, log-probs within
    1e-5 (fp32, images, rows stopping early and rows running to the limit)."""
    net, proc = tiny_vlm.build(arch_name)
    prompts = tiny_vlm.prompts(proc)
    kw = dict(group_size=3, max_new_tokens=64, temperature=1.0, stop_token_ids=tiny_vlm.STOP[:3], seed=5)
    want = Engine(net).generate(prompts, **kw)
    lengths = want.response_mask.sum(1)
    assert lengths.min() < 20 and lengths.max() == 64  # early stops and rows at the limit
    eng = Engine(net, check_every=2)
    eng.kv_budget_bytes = budget_for(eng, prompts, 17)
    got = eng.generate(prompts, **kw)
    assert got.stats["preemptions"] > 0
    assert_same_rollout(got, want)


def test_kv_budget_too_small_is_a_clear_error(tiny):
    net, prompts = tiny
    with pytest.raises(ValueError, match="one group needs"):
        Engine(net, kv_budget_bytes=1000).generate(prompts, group_size=2, max_new_tokens=4)
    with pytest.raises(ValueError, match="kv_budget_bytes must be > 0"):
        Engine(net, kv_budget_bytes=0)


def test_paged_store_holds_more_rows_than_a_static_reservation(tiny, tiny_vlm):
    """Under the same budget, rows in flight follow the tokens generated: more than a store that reserves
    max_new_tokens for every row could hold (most rows stop early here)."""
    net, prompts = tiny
    G, N = 3, 96
    eng = Engine(net, check_every=4)
    eng.kv_budget_bytes = budget_for(eng, prompts, 2 * (4 + G * N // BLOCK_SIZE))  # two whole groups, statically
    ro = eng.generate(prompts * 3, group_size=G, max_new_tokens=N, temperature=1.0, stop_token_ids=tiny_vlm.STOP,
                      seed=1)
    assert ro.response_mask.sum(1).float().mean() < N / 3
    assert ro.stats["rows_in_flight"] > 2 * G


def test_batch_invariance(tiny, tiny_vlm):
    """A prompt's samples depend on its prompt seed only: alone, batched with others, in another position."""
    net, prompts = tiny
    kw = dict(group_size=3, max_new_tokens=12, temperature=1.0, top_p=0.95, stop_token_ids=tiny_vlm.STOP)
    alone = Engine(net).generate([prompts[2]], prompt_seeds=[77], **kw)
    batched = Engine(net).generate([prompts[1], prompts[3], prompts[2], prompts[0]], prompt_seeds=[5, 6, 77, 8],
                                   **kw)
    for j in range(3):
        assert rows_of(batched, 6 + j) == rows_of(alone, j)
        n = len(rows_of(alone, j))
        assert (batched.logprobs[6 + j, :n] - alone.logprobs[j, :n]).abs().max() <= 1e-5
    assert len({tuple(rows_of(alone, j)) for j in range(3)}) == 3  # the G samples of a group differ
    other = Engine(net).generate([prompts[2]], prompt_seeds=[78], **kw)
    assert [rows_of(other, j) for j in range(3)] != [rows_of(alone, j) for j in range(3)]
    a = Engine(net).generate(prompts, seed=1, **kw)  # without prompt_seeds: (seed, prompt index, sample index)
    b = Engine(net).generate(prompts, seed=1, **kw)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)


def test_vision_tower_runs_once_per_prompt(tiny, monkeypatch):
    net, prompts = tiny
    calls = []
    encode = net.encode_images
    monkeypatch.setattr(net, "encode_images", lambda pv, grid: calls.append(pv.shape[0]) or encode(pv, grid))
    patches = sum(p["pixel_values"].shape[0] for p in prompts if p["pixel_values"] is not None)
    Engine(net).generate(prompts, group_size=4, max_new_tokens=6)
    assert calls == [patches]  # one prefill, each prompt's patches once (not G times)


@pytest.mark.parametrize("budget", [None, 1 << 30])
def test_one_state_serves_every_call(tiny, tiny_vlm, budget):
    """Sampled and greedy calls, other group sizes, fewer and shorter prompts: one state, built once, its store
    never reallocated (reserved or paged)."""
    net, prompts = tiny
    eng = Engine(net, max_prompt_len=64, kv_budget_bytes=budget)
    eng.generate(prompts, group_size=3, max_new_tokens=8, stop_token_ids=tiny_vlm.STOP)
    first = eng.state
    store = first.kv.pool if budget else first.kv.sk
    eng.generate(prompts[:2], group_size=3, max_new_tokens=8, temperature=0.0)  # greedy, fewer prompts
    eng.generate(prompts[1:2], group_size=2, max_new_tokens=8, top_k=5)
    assert eng.state is first and (first.kv.pool if budget else first.kv.sk) is store and eng.builds == 1
    ro = eng.generate(prompts, group_size=1, max_new_tokens=8, temperature=0.0)
    assert eng.state is first and ro.stats["builds"] == 1


def test_varying_prompt_lengths_build_the_state_once(tiny_vlm):
    """Steps whose longest prompt moves (image prompts of every size) reuse the state: its prompt capacity is sized
    once from the data's longest prompt (the trainer passes it), the store never reallocated."""
    net, proc = tiny_vlm.build("qwen3_vl")
    prompts = [proc.encode("Is it safe?" + " Describe it." * k, [tiny_vlm.image(16 + 16 * k, 32, k)])
               for k in range(5)]
    longest = max(p["input_ids"].numel() for p in prompts)
    eng = Engine(net, max_prompt_len=longest)
    for order in ([0, 2], [4, 1], [2, 3], [3, 0], [1, 2]):
        ro = eng.generate([prompts[i] for i in order], group_size=2, max_new_tokens=6, stop_token_ids=tiny_vlm.STOP)
        assert ro.stats["builds"] == 1 and ro.stats["capture_s"] == 0.0


def test_stop_ids_outside_the_vocabulary_are_an_error(tiny):
    net, prompts = tiny
    with pytest.raises(ValueError, match=r"stop token ids \[100000\]"):
        Engine(net).generate(prompts, group_size=2, max_new_tokens=4, stop_token_ids=(3, 100000))


def test_kv_cache_is_still_the_plain_oracle_cache():
    """KVCache (prefill, oracle) refuses to overflow: the engine sizes it exactly for the prompts."""
    c = KVCache(1, 1, 1, 2, 4)
    c.append(torch.ones(1, 2, dtype=torch.bool), torch.tensor([2]))
    with pytest.raises(ValueError, match="KVCache is full"):
        c.append(torch.ones(1, 1, dtype=torch.bool), torch.tensor([3]))
