"""The rollout engine's decode step (rollout/step.py, rollout/kv_pages.py) on tiny random models (CPU): it compiles
as one graph (the CPU proof that a CUDA graph can capture it) and never synchronises with the host; its paged
attention equals attention written out row by row; device randomness equals the host's; the scheduler's block
bookkeeping (rollout/scheduler.py) by hand; `--compile_rollout`'s compiled layer equals eager.
Run: .venv/bin/python -m pytest -q tests/test_engine_step.py
"""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from oracle import check_step_compiles
from rollout import randomness
from rollout.engine import Engine
from rollout.kv_pages import PagedAttention, PagedKV
from rollout.scheduler import Scheduler


@pytest.fixture(scope="module")
def tiny(tiny_vlm):
    net, proc = tiny_vlm.build("qwen3_vl")
    return net, tiny_vlm.prompts(proc)


# ----------------------------------------------------------------------------- the step: capturable, no host sync

def test_step_compiles_without_graph_breaks(tiny):
    """torch.compile(fullgraph=True) fails on any graph break (a data-dependent branch, a host read): the CPU
    check that the step is capturable as one graph. The compiled step does what the eager one does."""
    net, prompts = tiny
    st, shape = Engine(net, buckets=True).ready(prompts, group_size=3, max_new_tokens=12, steps=2,
                                                stop_token_ids=range(40))
    check_step_compiles(st, shape)


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
    st, shape = Engine(net, buckets=True).ready(prompts, group_size=3, max_new_tokens=12, steps=3,
                                                stop_token_ids=range(40))
    with torch.no_grad(), no_host_sync(monkeypatch):
        for _ in range(3):
            st.step(shape)
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


# ----------------------------------------------------------------------------- the paged store, by hand

@torch.no_grad()
def test_paged_attention_written_out_row_by_row():
    """PagedAttention.attend == attention written out per row over [its prompt's real keys | its own response keys
    so far], read through shuffled block tables: prompts of different lengths, rows at different lengths, garbage in
    every unused position (and in block 0) that must stay masked; the new key lands in its row's block."""
    torch.manual_seed(0)
    L, Hkv, H, D, bs, G = 1, 2, 4, 8, 4, 3
    kv = PagedKV(L, Hkv, D, num_blocks=40, block_size=bs, dtype=torch.float32, device="cpu")
    kv.resize(group_slots=2, rows=6, prompt_len=3 * bs, max_new_tokens=2 * bs)
    kv.pool.normal_()  # garbage everywhere, real or not
    blocks = torch.randperm(39)[:20] + 1  # never block 0
    prompt_len = [10, 5]
    kv.prefix_table[0] = blocks[:3]
    kv.prefix_table[1, :2] = blocks[3:5]  # its third entry stays block 0 (unused)
    for s, n in enumerate(prompt_len):
        kv.prefix_bias[s, n:] = float("-inf")
    lengths = torch.tensor([1, 4, 2, 6, 5, 8])  # response tokens so far, this step's included
    for r in range(6):
        kv.response_table[r, :(int(lengths[r]) - 1) // bs + 1] = blocks[5 + 2 * r:5 + 2 * r + 2][:(int(lengths[r]) - 1) // bs + 1]
    step = PagedAttention(kv, rows=6, group_size=G, length=8, lengths=lengths)
    q, k, v = torch.randn(6, H, 1, D), torch.randn(6, Hkv, 1, D), torch.randn(6, Hkv, 1, D)
    got = step.for_layer(kv.pool[0]).attend(None, q, k, v)
    rep = H // Hkv

    def positions(table_row, n):  # the first n token positions a table row points at: (block, offset)
        return [(int(table_row[t // bs]), t % bs) for t in range(n)]
    for r in range(6):
        s, n, m = r // G, prompt_len[r // G], int(lengths[r])
        blk, off = positions(kv.response_table[r], m)[-1]
        assert torch.equal(kv.pool[0, :, blk, off, 0], k[r, :, 0])  # this step's key went to its block
        pre = positions(kv.prefix_table[s], n)
        own = positions(kv.response_table[r], m)
        keys = torch.stack([kv.pool[0, :, b, o, 0] for b, o in pre + own], dim=1).repeat_interleave(rep, 0)
        vals = torch.stack([kv.pool[0, :, b, o, 1] for b, o in pre + own], dim=1).repeat_interleave(rep, 0)
        want = torch.softmax((q[r] @ keys.transpose(1, 2)) * D ** -0.5, -1) @ vals  # (H, 1, D)
        assert (got[r] - want).abs().max() <= 1e-5, f"row {r}"


def test_scheduler_admits_grows_preempts_and_frees():
    """Blocks of 4 tokens, G = 2, 3 prompts of 6, 3 and 9 tokens, 16 new tokens at most, 12 usable blocks."""
    s = Scheduler(num_blocks=13, block_size=4, group_size=2, max_new_tokens=16, slots=3, prompt_lens=[6, 3, 9])
    assert s.group_blocks(9, 16) == 3 + 2 * 4
    first = s.admit(steps=4)
    # prompt 0: 2 blocks + 2 x 1 first block; prompt 1: 1 + 2 x 1 + 2 rows of growth; prompt 2 (3 + 2) does not fit
    assert [g.prompt for g in first] == [0, 1] and list(s.waiting) == [2]
    assert s.held() == 3 + 4  # prompt blocks, and each row's first block
    assert s.grow(4) == ([], [])  # the first 4 steps write positions 0..3: the first block holds them
    s.stepped(4)  # lengths 5: the next 4 steps write positions 4..7, a second block per row
    preempted, entries = s.grow(4)
    assert not preempted and s.held() == 3 + 8
    s.stepped(4)  # lengths 9: positions 8..11 need a third block per row: 4 more, 1 free -> preempt prompt 1
    preempted, entries = s.grow(4)
    assert [g.prompt for g in preempted] == [1] and list(s.waiting) == [1, 2] and s.preemptions == 1
    assert s.held() == 2 + 2 * 3
    freed, finished = s.looked({0: [True, False]}, {0: [9, 9]})  # row 0 stopped: its 3 blocks come back
    assert freed == [(0, 0)] and not finished and s.held() == 2 + 3
    freed, finished = s.looked({0: [True, True]}, {0: [9, 12]})
    assert [g.prompt for g in finished] == [0] and s.held() == 0 and not s.live
    with pytest.raises(ValueError, match="one group needs 11"):
        Scheduler(num_blocks=11, block_size=4, group_size=2, max_new_tokens=16, slots=1, prompt_lens=[9])


def test_static_reservation_holds_every_row_at_its_limit():
    s = Scheduler(num_blocks=25, block_size=4, group_size=2, max_new_tokens=16, slots=4, prompt_lens=[4] * 4,
                  reserve_full=True)
    assert len(s.admit(steps=4)) == 2  # 1 + 2 x 4 blocks each: two fit in 24
    assert s.grow(4) == ([], []) and s.held() == 18


# ----------------------------------------------------------------------------- --compile_rollout

@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_compiled_layer_equals_eager(tiny_vlm, temperature):
    """The step with every decoder layer through one torch.compile (inductor; the engine's graphs capture it on a
    GPU): greedy and sampled tokens equal the eager step's, log-probs within 1e-5 (fp32), over both stores, several
    response-length buckets and row counts, with one compilation for all of them."""
    from torch._dynamo.utils import counters
    net, proc = tiny_vlm.build("qwen3_vl")
    prompts = tiny_vlm.prompts(proc)
    kw = dict(group_size=3, max_new_tokens=40, temperature=temperature, stop_token_ids=tiny_vlm.STOP[:8], seed=6)
    for budget in (None, 1 << 20):
        eager = Engine(net, kv_budget_bytes=budget).generate(prompts, **kw)
        assert len(set(eager.response_mask.sum(1).tolist())) > 2
        compiled = Engine(net, kv_budget_bytes=budget, compile=True).generate(prompts, **kw)
        assert torch.equal(compiled.response_ids, eager.response_ids)
        assert float((compiled.logprobs - eager.logprobs).abs().max()) <= 1e-5
    assert counters["stats"]["unique_graphs"] <= 2  # one per store kind, not one per layer or shape
