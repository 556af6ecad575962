"""rollout/engine.py and rollout/kv_slots.py on tiny random Qwen3-VL / Qwen2.5-VL models (fp32, CPU): the static-shape engine
equals the slow obvious sampler (tests/oracle.py) in tokens and log-probs, with images, uneven prompts, rows stopping
early, bucketed shapes and small KV budgets (continuous batching); its step compiles without graph breaks and never
synchronises with the host; device randomness equals the host's. GPU tests (skipped without CUDA): CUDA-graph replay
equals eager, graphs stay right after an optimizer step, bf16 log-probs match the training forward.
Run: .venv/bin/python -m pytest -q tests/test_engine.py
"""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rollout import randomness
from rollout import engine
import logprobs
from rollout.engine import Engine
from model.kv_cache import KVCache
from rollout.kv_slots import SlotCache
from oracle import check_step_compiles, oracle_generate, reference_generate

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
def test_engine_equals_oracle(arch, tiny_vlm, temperature, top_p, top_k, buckets, check_every):
    """Same tokens, masks, finish reasons and log-probs as one plain KVCache per row with host randomness; with
    exact shapes, and with rows and response lengths rounded up to buckets (more masked keys, more rows)."""
    net, prompts = arch
    kw = dict(group_size=3, max_new_tokens=12, temperature=temperature, top_p=top_p, top_k=top_k,
              stop_token_ids=tiny_vlm.STOP, seed=5)
    want = oracle_generate(net, prompts, **kw)
    assert len(set(want.response_mask.sum(1).tolist())) > 1  # rows stop at different steps
    got = Engine(net, buckets=buckets, check_every=check_every).generate(prompts, **kw)
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

@pytest.mark.parametrize("buckets", [False, True])
@pytest.mark.parametrize("groups", [1, 2, 3])
def test_kv_budget_equals_unlimited_and_holds(tiny, tiny_vlm, buckets, groups):
    """A budget that holds 1, 2 or 3 of the 4 groups: prompts wait, are admitted as groups finish, live groups
    move down; tokens and log-probs equal an unlimited run, and the KV held never exceeds the budget."""
    net, prompts = tiny
    kw = dict(group_size=3, max_new_tokens=12, temperature=1.0, stop_token_ids=tiny_vlm.STOP, seed=5)
    want = Engine(net).generate(prompts, **kw)
    eng = Engine(net, buckets=buckets, check_every=2)
    longest = max(p["input_ids"].numel() for p in prompts)
    Tp = engine.prefix_bucket(longest) if buckets else longest
    budget = eng.slot_bytes(3, Tp, 12, torch.float32, torch.float32) * groups
    eng.kv_budget_bytes = budget
    got = eng.generate(prompts, **kw)
    assert_same_rollout(got, want)
    assert got.stats["slots"] == groups
    assert got.stats["kv_peak_bytes"] <= budget and got.stats["kv_cache_bytes"] <= budget


def test_kv_budget_too_small_is_a_clear_error(tiny):
    net, prompts = tiny
    with pytest.raises(ValueError, match="kv_budget_bytes=1000 holds no group"):
        Engine(net, kv_budget_bytes=1000).generate(prompts, group_size=2, max_new_tokens=4)
    with pytest.raises(ValueError, match="kv_budget_bytes must be > 0"):
        Engine(net, kv_budget_bytes=0)


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


def test_state_is_reused_while_its_shape_and_weights_hold(tiny):
    net, prompts = tiny
    eng = Engine(net)
    kw = dict(group_size=2, max_new_tokens=5)
    eng.generate(prompts, **kw)
    first = eng.state
    eng.generate(prompts[:2], **kw)  # fewer prompts, shorter: fits the same slots
    assert eng.state is first
    eng.generate(prompts, group_size=3, max_new_tokens=5)  # another shape: new state
    assert eng.state is not first


# ----------------------------------------------------------------------------- the step: capturable, no host sync

def admitted(net, prompts, G=3, N=12, **engine_kw):
    """An engine state with every prompt admitted, ready for steps."""
    eng = Engine(net, **engine_kw)
    eng.generate(prompts, group_size=G, max_new_tokens=N, stop_token_ids=range(40))
    st = eng.state
    st.reset()
    st.is_stop[:40] = True
    st.admit(list(range(len(prompts))), prompts, randomness.row_keys(0, len(prompts), G), 0)
    st.rows, st.length = len(prompts) * G, N
    return st


def test_step_compiles_without_graph_breaks(tiny):
    """torch.compile(fullgraph=True) fails on any graph break (a data-dependent branch, a host read): the CPU
    check that the step is capturable as one graph. The compiled step does what the eager one does."""
    net, prompts = tiny
    check_step_compiles(admitted(net, prompts, buckets=True))


class NoHostSync(TorchDispatchMode):
    """Fails on any read of a tensor's value by the host: .item(), bool(), int(), .tolist() all dispatch
    aten._local_scalar_dense; .cpu()/.numpy()/.tolist() are patched to fail as well (on a CPU tensor .cpu() would
    not dispatch anything)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("host synchronisation inside the step: a tensor value was read by Python")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_sync(monkeypatch):
    def fail(name):
        def f(*a, **k):
            raise AssertionError(f"host synchronisation inside the step: Tensor.{name}")
        return f
    with monkeypatch.context() as m:
        for name in ("cpu", "tolist", "numpy", "item", "__bool__"):
            m.setattr(torch.Tensor, name, fail(name))
        with NoHostSync():
            yield


def test_step_never_synchronises_with_the_host(tiny, monkeypatch):
    net, prompts = tiny
    st = admitted(net, prompts, buckets=True)
    with torch.no_grad(), no_host_sync(monkeypatch):
        for _ in range(3):
            st.step()
    with pytest.raises(AssertionError, match="host synchronisation"):  # the guard itself works
        with no_host_sync(monkeypatch):
            bool(st.done.any())


def test_device_uniforms_equal_host_uniforms():
    keys = randomness.row_keys(seed=3, num_prompts=20, group_size=8) + [0, randomness.MASK64, 1 << 63]
    mixed = torch.tensor([randomness._as_int64(randomness.splitmix64(k)) for k in keys])
    for step in (0, 1, 77, 4095):
        want = torch.tensor(randomness.uniforms(keys, step), dtype=torch.float64)
        got = randomness.uniforms_t(mixed, torch.full_like(mixed, step))
        assert torch.equal(got, want), step


# ----------------------------------------------------------------------------- the slot cache, by hand

@torch.no_grad()
def test_slot_cache_attention_written_out_row_by_row():
    """SlotCache.attend == attention written out per row over [its prompt's real keys | its own response keys so
    far]: prompts of different lengths (right-padded slots), rows at different lengths, keys beyond a row's length
    holding garbage that must stay masked."""
    torch.manual_seed(0)
    L, S, G, Hkv, H, Tp, N, D = 1, 2, 3, 2, 4, 5, 6, 8
    c = SlotCache(L, S, G, Hkv, Tp, N, D, torch.float32, "cpu")
    c.pk.normal_(), c.pv.normal_(), c.sk.normal_(), c.sv.normal_()  # garbage everywhere, real or not
    prompt_len = [5, 3]
    for s, n in enumerate(prompt_len):
        c.prefix_bias[s * G:(s + 1) * G, n:] = float("-inf")
    lengths = torch.tensor([1, 4, 2, 6, 3, 1])  # response tokens so far, this step's included
    R, Ls = S * G, 6
    c.rows, c.length, c.write_at = R, Ls, lengths - 1
    own = torch.zeros(R, Ls).masked_fill_(torch.arange(Ls) >= lengths[:, None], float("-inf"))
    c.bias = torch.cat((c.prefix_bias, own), dim=1)
    q, k, v = torch.randn(R, H, 1, D), torch.randn(R, Hkv, 1, D), torch.randn(R, Hkv, 1, D)
    got = c.attend(0, q, k, v)
    rep = H // Hkv
    for r in range(R):
        s, n, m = r // G, prompt_len[r // G], int(lengths[r])
        assert torch.equal(c.sk[0, r, :, m - 1], k[r, :, 0])  # this step's key went to its position
        keys = torch.cat([c.pk[0, s, :, :n], c.sk[0, r, :, :m]], dim=1).repeat_interleave(rep, 0)  # (H, n+m, D)
        vals = torch.cat([c.pv[0, s, :, :n], c.sv[0, r, :, :m]], dim=1).repeat_interleave(rep, 0)
        want = torch.softmax((q[r] @ keys.transpose(1, 2)) * D ** -0.5, -1) @ vals  # (H, 1, D)
        assert (got[r] - want).abs().max() <= 1e-5, f"row {r}"


# ----------------------------------------------------------------------------- precision: the trainer's autocast

def test_autocast_rollout_reads_low_precision_copies_refreshed_each_call(tiny, tiny_vlm):
    """Under bf16 autocast with fp32 weights the step reads bf16 copies of the linear layers (as autocast would
    cast them), refreshed at every generate: after an in-place weight update a kept engine samples what a fresh
    one samples."""
    net, prompts = tiny
    net = type(net)(net.config).eval()
    net.load_state_dict(tiny[0].state_dict())
    kw = dict(group_size=2, max_new_tokens=6, temperature=1.0, stop_token_ids=tiny_vlm.STOP, seed=2)
    kept = Engine(net)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept.generate(prompts, **kw)
        assert kept.state.copies and all(c.dtype == torch.bfloat16 for _, c in kept.state.copies.values())
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(1.5)  # in place, as an optimizer step
        again = kept.generate(prompts, **kw)
        fresh = Engine(net).generate(prompts, **kw)
    assert_same_rollout(again, fresh, tol=0)


# ----------------------------------------------------------------------------- GPU (bench/gpu.sh runs these)

def cuda_model(tiny_vlm, dtype=torch.float32):
    net, proc = tiny_vlm.build("qwen3_vl")
    return net.to("cuda", dtype), tiny_vlm.prompts(proc)


@CUDA
def test_cuda_graph_replay_equals_eager(tiny_vlm):
    net, prompts = cuda_model(tiny_vlm)
    kw = dict(group_size=3, max_new_tokens=20, temperature=1.0, stop_token_ids=tiny_vlm.STOP, seed=1)
    eager = Engine(net, cuda_graphs=False, buckets=True).generate(prompts, **kw)
    graphs = Engine(net, cuda_graphs=True)
    got = graphs.generate(prompts, **kw)
    assert got.stats["graphs"] > 0
    assert_same_rollout(got, eager, tol=1e-4)
    budget = Engine(net, cuda_graphs=True)  # continuous batching under graphs: 2 of 4 groups at a time
    budget.kv_budget_bytes = 2 * budget.slot_bytes(3, engine.prefix_bucket(max(p["input_ids"].numel()
                                                                                for p in prompts)), 20,
                                                   torch.float32, torch.float32)
    assert_same_rollout(budget.generate(prompts, **kw), eager, tol=1e-4)


@CUDA
def test_cuda_graphs_stay_right_after_an_optimizer_step(tiny_vlm):
    net, prompts = cuda_model(tiny_vlm)
    kw = dict(group_size=2, max_new_tokens=16, temperature=1.0, stop_token_ids=tiny_vlm.STOP, seed=3)
    kept = Engine(net, cuda_graphs=True)
    kept.generate(prompts, **kw)
    state = kept.state
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    net.train()
    out = net(prompts[1]["input_ids"].cuda()[None])
    out.float().logsumexp(-1).mean().backward()
    opt.step()  # parameters change in place
    net.eval()
    after = kept.generate(prompts, **kw)
    assert kept.state is state  # the same graphs were replayed
    fresh = Engine(net, cuda_graphs=False, buckets=True).generate(prompts, **kw)
    assert_same_rollout(after, fresh, tol=1e-4)


@CUDA
def test_cuda_step_has_no_host_sync(tiny_vlm):
    net, prompts = cuda_model(tiny_vlm, torch.bfloat16)
    st = admitted(net, prompts, cuda_graphs=False, buckets=True)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            st.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@CUDA
def test_cuda_bf16_autocast_logprobs_match_training_forward(tiny_vlm):
    """The trainer's setting: fp32 weights, bf16 autocast. Sampler log-probs vs the training forward's
    recomputation of the same tokens: close (the step rounds like the forward; attention kernels differ)."""
    net, prompts = cuda_model(tiny_vlm)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ro = Engine(net, cuda_graphs=True).generate(prompts, group_size=4, max_new_tokens=16, temperature=1.0,
                                                     stop_token_ids=tiny_vlm.STOP, seed=0)
        per_row = [prompts[int(i)] for i in ro.prompt_index]
        batch = logprobs.collate(per_row, ro.response_ids, ro.response_mask, 0, "cuda", net.rope_index,
                              net.config.image_token_id)
        with torch.no_grad():
            logp, _ = logprobs.response_logprobs(net, batch, ro.response_ids.cuda(), 1.0)
    mask = ro.response_mask.bool()
    delta = (ro.logprobs - logp.float().cpu())[mask].abs()
    assert float(delta.mean()) <= 2e-2 and float(delta.max()) <= 0.5, (float(delta.mean()), float(delta.max()))


def test_kv_cache_is_still_the_plain_oracle_cache():
    """KVCache (prefill, oracle) refuses to overflow: the engine sizes it exactly for the prompts."""
    c = KVCache(1, 1, 1, 2, 4)
    c.append(torch.ones(1, 2, dtype=torch.bool), torch.tensor([2]))
    with pytest.raises(ValueError, match="KVCache is full"):
        c.append(torch.ones(1, 1, dtype=torch.bool), torch.tensor([3]))
