"""What the rollout engine reads (rollout/weights.py), on tiny random models (CPU): bf16 copies under the trainer's
autocast, refreshed at every call; LoRA updates seen inside one autocast region; graphs keyed by the adapters' flags;
an evaluation between rollouts shares the one state; under FSDP2 a whole copy of the weights, refreshed in place,
whose rollouts over 2 processes equal 1 process (slow: torchrun).
Run: .venv/bin/python -m pytest -q tests/test_rollout_weights.py
"""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lora_kit import randomize_adapters
from model.lora import adapters_disabled, add_lora
from rollout.engine import Engine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tiny_vlm):
    net, proc = tiny_vlm.build("qwen3_vl")
    return net, tiny_vlm.prompts(proc)


def same_rollout(a, b, tol=0.0) -> bool:
    return torch.equal(a.response_ids, b.response_ids) and float((a.logprobs - b.logprobs).abs().max()) <= tol


def test_autocast_rollout_reads_low_precision_copies_refreshed_each_call(tiny, tiny_vlm):
    """Under bf16 autocast with fp32 weights the step reads bf16 copies of the linear layers (as autocast would
    cast them), refreshed at every generate: after an in-place weight update a kept engine samples what a fresh
    one samples."""
    net, prompts = tiny
    net = copy.deepcopy(net)
    kw = dict(group_size=2, max_new_tokens=6, temperature=1.0, stop_token_ids=tiny_vlm.STOP, seed=2)
    kept = Engine(net)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept.generate(prompts, **kw)
        copies = kept.state.weights.copies
        assert copies and all(c.dtype == torch.bfloat16 for _, c in copies.values())
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(1.5)  # in place, as an optimizer step
        again = kept.generate(prompts, **kw)
        fresh = Engine(net).generate(prompts, **kw)
    assert same_rollout(again, fresh)


@pytest.mark.parametrize("targets", [("o",), ("down",), ("q", "k", "v", "o", "gate", "up", "down")])
def test_lora_update_is_seen_inside_one_autocast_region(tiny_vlm, targets):
    """The trainer keeps one bf16 autocast region around a rollout; autocast caches the bf16 cast of a leaf tensor
    that requires grad (a single adapted projection hands it lora_A / lora_B directly) until the region exits. The
    step's own autocast has no cast cache, so an in-place adapter update between two rollouts of one region is seen:
    the kept engine samples what an engine on an independent copy of the updated model samples."""
    net, proc = tiny_vlm.build("qwen3_vl")
    add_lora(net, rank=4, alpha=8.0, targets=targets)
    randomize_adapters(net, scale=0.3)
    prompts = tiny_vlm.prompts(proc)
    kw = dict(group_size=2, max_new_tokens=8, temperature=1.0, stop_token_ids=tiny_vlm.STOP, seed=3)
    kept = Engine(net)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = kept.generate(prompts, **kw)
        randomize_adapters(net, seed=7, scale=0.3)  # in place, as an optimizer step
        after = kept.generate(prompts, **kw)
        independent = Engine(copy.deepcopy(net)).generate(prompts, **kw)  # other tensors: no cached cast to reuse
    assert not same_rollout(before, after, tol=1e-3)
    assert same_rollout(after, independent)


def test_graph_key_follows_the_adapters(tiny_vlm):
    """A graph captured with adapters on must never replay for the reference (adapters off): the adapters' flags are
    part of what the graphs are keyed on, and switching them gives another rollout."""
    net, proc = tiny_vlm.build("qwen3_vl")
    add_lora(net, rank=4, alpha=8.0)
    randomize_adapters(net, scale=0.3)
    prompts = tiny_vlm.prompts(proc)
    kw = dict(group_size=2, max_new_tokens=6, temperature=1.0, stop_token_ids=tiny_vlm.STOP, seed=3)
    eng = Engine(net)
    on = eng.generate(prompts, **kw)
    key_on = eng.state.weights.key()
    with adapters_disabled(net):
        off = eng.generate(prompts, **kw)
        assert eng.state.weights.key() != key_on
    assert not same_rollout(on, off, tol=1e-3) and eng.builds == 1


def test_an_evaluation_between_rollouts_shares_the_state(tiny, tiny_vlm):
    """train.py evaluates (greedy, one sample per prompt, more prompts) with the rollout's own engine: the store is
    not reallocated and its bytes do not grow (only its small tables grow once, for the evaluation's prompts)."""
    net, prompts = tiny
    eng = Engine(net, kv_budget_bytes=4 << 20, max_prompt_len=64)
    rollout = dict(group_size=3, max_new_tokens=10, temperature=1.0, stop_token_ids=tiny_vlm.STOP, seed=1)
    first = eng.generate(prompts, **rollout)
    pool = eng.state.kv.pool
    eng.generate(prompts * 3, group_size=1, max_new_tokens=10, temperature=0.0, stop_token_ids=tiny_vlm.STOP)
    builds = eng.builds
    again = eng.generate(prompts, **rollout)
    assert eng.state.kv.pool is pool and eng.builds == builds
    assert again.stats["kv_cache_bytes"] == first.stats["kv_cache_bytes"]
    assert same_rollout(first, again)


@pytest.mark.slow
def test_fsdp2_rollouts_over_two_processes_equal_one_process(tmp_path):
    """torchrun --nproc_per_node=2 with the policy sharded by FSDP2 (fp32, gloo): rollouts before and after an
    optimizer step equal one process's rollouts of the unsharded model; the engine's copy of the weights holds no
    DTensor, keeps its addresses across the update (so CUDA graphs replay over it) and follows the update; the step
    on it compiles as one graph (tests/dist_rollout_check.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = os.path.join(ROOT, "tests", "dist_rollout_check.py")
    one = subprocess.run([sys.executable, script, str(tmp_path / "one")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script,
                          str(tmp_path / "two")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    facts = json.load(open(tmp_path / "two" / "facts.json"))
    assert facts == {"sharded_live": True, "copy_has_dtensor": False, "copy_kept_addresses": True,
                     "built_once": True, "kept_equals_fresh": True, "compiles": True}
    a, b = load_file(str(tmp_path / "one" / "rollouts.safetensors")), load_file(str(tmp_path / "two" /
                                                                                    "rollouts.safetensors"))
    assert not torch.equal(a["first_response_ids"], a["second_response_ids"])  # the update changed the samples
    for k in a:
        if "logprobs" in k:
            assert float((a[k] - b[k]).abs().max()) <= 1e-5, k
        else:
            assert torch.equal(a[k], b[k]), k
