"""The rollout engine on a CUDA GPU (skipped without one; bench/gpu.sh runs them): CUDA-graph replay equals the eager
step, with and without a budget (paged store, continuous batching); graphs stay right after an optimizer step, in
fp32 and with LoRA adapters under the trainer's bf16 autocast; the step never synchronises with the host; bf16
log-probs match the training forward; the compiled step (--compile_rollout) equals the eager one.
"""
import pytest
import torch

import logprobs
from lora_kit import randomize_adapters
from model.lora import add_lora
from rollout.engine import Engine

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu.sh runs it)")


def cuda_model(tiny_vlm, dtype=torch.float32):
    net, proc = tiny_vlm.build("qwen3_vl")
    return net.to("cuda", dtype), tiny_vlm.prompts(proc)


def assert_same_rollout(got, want, tol):
    assert torch.equal(got.response_ids, want.response_ids)
    assert torch.equal(got.response_mask, want.response_mask)
    assert (got.logprobs - want.logprobs).abs().max() <= tol


@CUDA
@pytest.mark.parametrize("budget", [None, 1 << 22])
def test_cuda_graph_replay_equals_eager(tiny_vlm, budget):
    net, prompts = cuda_model(tiny_vlm)
    kw = dict(group_size=3, max_new_tokens=20, temperature=1.0, stop_token_ids=tiny_vlm.STOP, seed=1)
    eager = Engine(net, cuda_graphs=False, buckets=True, kv_budget_bytes=budget).generate(prompts, **kw)
    graphs = Engine(net, cuda_graphs=True, kv_budget_bytes=budget)
    got = graphs.generate(prompts, **kw)
    assert got.stats["graphs"] > 0 and got.stats["capture_s"] > 0
    assert_same_rollout(got, eager, tol=1e-4)
    again = graphs.generate(prompts, **kw)  # every shape captured: replays only
    assert again.stats["capture_s"] == 0.0
    assert_same_rollout(again, eager, tol=1e-4)


@CUDA
@pytest.mark.parametrize("lora", [False, True])
def test_cuda_graphs_stay_right_after_an_optimizer_step(tiny_vlm, lora):
    """fp32; and LoRA adapters (fp32) on a bf16 base under the trainer's bf16 autocast, the one-GPU setting, where
    a cached autocast cast of the adapters would be read by every replay: the kept engine's graphs replay the
    updated weights."""
    net, prompts = cuda_model(tiny_vlm, torch.bfloat16 if lora else torch.float32)
    if lora:
        add_lora(net, rank=4, alpha=8.0, targets=("o", "down"))
        randomize_adapters(net, scale=0.3)
    params = [p for p in net.parameters() if p.requires_grad]
    kw = dict(group_size=2, max_new_tokens=16, temperature=1.0, stop_token_ids=tiny_vlm.STOP, seed=3)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=lora):
        kept = Engine(net, cuda_graphs=True)
        before = kept.generate(prompts, **kw)
        state = kept.state
        opt = torch.optim.AdamW(params, lr=5e-2)
        net.train()
        net(prompts[1]["input_ids"].cuda()[None]).float().logsumexp(-1).mean().backward()
        opt.step()  # parameters change in place
        net.eval()
        after = kept.generate(prompts, **kw)
        assert kept.state is state and after.stats["capture_s"] == 0.0  # the same graphs were replayed
        fresh = Engine(net, cuda_graphs=False, buckets=True).generate(prompts, **kw)
    assert not torch.equal(before.logprobs, after.logprobs)
    assert_same_rollout(after, fresh, tol=1e-4 if not lora else 2e-2)


@CUDA
def test_cuda_step_has_no_host_sync(tiny_vlm):
    net, prompts = cuda_model(tiny_vlm, torch.bfloat16)
    st, shape = Engine(net, cuda_graphs=False, buckets=True).ready(prompts, group_size=3, max_new_tokens=12,
                                                                   steps=2, stop_token_ids=range(40))
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            st.step(shape)
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


@CUDA
def test_cuda_compiled_step_equals_eager_under_graphs(tiny_vlm):
    net, prompts = cuda_model(tiny_vlm)
    kw = dict(group_size=3, max_new_tokens=24, temperature=1.0, stop_token_ids=tiny_vlm.STOP, seed=2)
    eager = Engine(net, cuda_graphs=True, kv_budget_bytes=1 << 22).generate(prompts, **kw)
    compiled = Engine(net, cuda_graphs=True, kv_budget_bytes=1 << 22, compile=True).generate(prompts, **kw)
    assert_same_rollout(compiled, eager, tol=1e-4)
