"""LoRA in the rollout engine: it samples with the adapters active, a kept engine follows adapter updates, the step
with adapters compiles as one graph, a bf16 base with fp32 adapters under autocast. Tiny random models, CPU.
"""
import pytest
import torch

import model
from conftest import STOP, build_tiny, make_prompts
from lora_kit import ARCHS, one_step, randomize_adapters, snapshot
from model.lora import adapters_disabled, add_lora, is_lora_key, merged, save_merged, trainable_parameters
from oracle import check_step_compiles
from rollout.engine import Engine


# ----------------------------------------------------------------------------- the rollout engine

@pytest.mark.parametrize("arch", ARCHS)
def test_engine_samples_with_adapters(arch, tmp_path):
    """The engine reads the adapted layers through their forward: a LoRA model samples what its merged copy
    samples; log-probs equal the training forward with the adapters on."""
    net, proc = build_tiny(arch)
    add_lora(net, rank=4, alpha=8.0, vision=True)
    randomize_adapters(net, scale=0.2)
    prompts = make_prompts(proc)
    kw = dict(group_size=3, max_new_tokens=10, temperature=1.0, stop_token_ids=STOP, seed=5)
    got = Engine(net).generate(prompts, **kw)
    save_merged(net, tmp_path / "m")
    want = Engine(model.load(tmp_path / "m")).generate(prompts, **kw)
    assert torch.equal(got.response_ids, want.response_ids)
    assert torch.equal(got.response_mask, want.response_mask)
    assert (got.logprobs - want.logprobs).abs().max() <= 1e-5
    with adapters_disabled(net):
        base = Engine(net).generate(prompts, **kw)
    assert not torch.equal(base.response_ids, got.response_ids)  # the adapters steer the samples
    with merged(net):  # merged in place for the rollout: the same samples
        in_place = Engine(net).generate(prompts, **kw)
    assert torch.equal(in_place.response_ids, got.response_ids)
    assert (in_place.logprobs - got.logprobs).abs().max() <= 1e-5


def test_kept_engine_follows_adapter_updates():
    """An engine kept across steps (as train.py keeps it) samples from the updated adapters, under the trainer's
    bf16 autocast too, where it reads bf16 copies of the base weights and the live fp32 adapters."""
    net, proc = build_tiny("qwen3_vl")
    add_lora(net, rank=4, alpha=8.0)
    prompts = make_prompts(proc)
    kw = dict(group_size=2, max_new_tokens=8, temperature=1.0, stop_token_ids=STOP, seed=2)
    for amp in (False, True):
        kept = Engine(net)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            kept.generate(prompts, **kw)
            if amp:
                copies = kept.state.weights.copies
                assert copies and not any(".lora_" in n for n in copies)
            state = kept.state
            randomize_adapters(net, seed=int(amp), scale=0.2)  # in place, as an optimizer step
            again = kept.generate(prompts, **kw)
            assert kept.state is state
            fresh = Engine(net).generate(prompts, **kw)
        assert torch.equal(again.response_ids, fresh.response_ids)
        assert torch.equal(again.logprobs, fresh.logprobs)


def test_engine_step_with_adapters_compiles_as_one_graph():
    """The adapted layers keep the decode step capturable (CUDA graphs on a GPU): torch.compile(fullgraph=True)
    fails on any graph break; the compiled step does what the eager one does."""
    net, proc = build_tiny("qwen3_vl")
    add_lora(net, rank=4, alpha=8.0)
    randomize_adapters(net, scale=0.2)
    prompts = make_prompts(proc)
    st, shape = Engine(net, buckets=True).ready(prompts, group_size=3, max_new_tokens=12, steps=2,
                                                stop_token_ids=STOP)
    check_step_compiles(st, shape)


def test_bf16_base_with_fp32_adapters_under_autocast():
    """The one-GPU setting: frozen base stored in bf16 (half the bytes), fp32 adapters, bf16 autocast. Gradients
    reach the adapters in fp32; the engine reads the bf16 base directly (no copies) and the adapters live."""
    net, proc = build_tiny("qwen3_vl")
    net.to(torch.bfloat16)
    add_lora(net, rank=4, alpha=8.0)
    assert all(p.dtype == torch.float32 for _, p in trainable_parameters(net))
    randomize_adapters(net, scale=0.2)
    prompts = make_prompts(proc)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eng = Engine(net)
        ro = eng.generate(prompts[:2], group_size=2, max_new_tokens=6, temperature=1.0, stop_token_ids=STOP, seed=1)
        assert not eng.state.weights.copies and eng.state.weights.module is net
        with adapters_disabled(net):
            base = Engine(net).generate(prompts[:2], group_size=2, max_new_tokens=6, temperature=1.0,
                                        stop_token_ids=STOP, seed=1)
        assert not torch.equal(ro.logprobs, base.logprobs)
        opt = torch.optim.AdamW([p for _, p in trainable_parameters(net)], lr=1e-2)
        before = snapshot(net)
        one_step(net, proc, opt)
    assert all(p.grad is None for p in net.parameters())
    changed = {k for k in before if not torch.equal(before[k], net.state_dict()[k])}
    assert changed == {k for k in before if is_lora_key(k)}
