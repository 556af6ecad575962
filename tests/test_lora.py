"""model/lora.py on tiny random Qwen3-VL / Qwen2.5-VL models (fp32, CPU): with B = 0 the model is the base model
bit for bit; after an optimizer step only adapter tensors changed (and with freeze_vision no vision tensor); with
adapters disabled the log-probs are a separately loaded base model's, on the plain and the shared-prefix forward;
targets adapt exactly their rows; merged weights equal base + adapters. Files: test_lora_files.py; the rollout engine:
test_lora_rollout.py. Run: .venv/bin/python -m pytest -q tests/test_lora*.py
"""
import pytest
import torch

import model
from conftest import build_tiny, make_prompts
from lora_kit import ARCHS, image_prompt, logits_of, one_step, randomize_adapters, responses, snapshot, training_logprobs
from model.lora import (LoRALinear, adapters_disabled, add_lora, check_targets, freeze_vision, is_lora_key,
                        lora_config, lora_modules, merge_lora, merged, trainable_parameters, unmerge_lora)


# ----------------------------------------------------------------------------- the base model, bit for bit

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("vision", [False, True])
def test_zero_B_equals_base_exactly(arch, vision):
    net, proc = build_tiny(arch)
    prompts = make_prompts(proc)
    ids, mask = responses()
    with torch.no_grad():
        want = [logits_of(net, p) for p in prompts], training_logprobs(net, prompts[:3], ids, mask, shared=True)
    add_lora(net, rank=4, alpha=8.0, vision=vision, seed=3)
    assert all(bool(A.abs().sum() > 0) for n, A in net.named_parameters() if ".lora_A." in n)  # A is not zero
    with torch.no_grad():
        got = [logits_of(net, p) for p in prompts], training_logprobs(net, prompts[:3], ids, mask, shared=True)
    assert all(torch.equal(g, w) for g, w in zip(got[0], want[0]))
    assert torch.equal(got[1], want[1])


def test_only_adapters_are_trainable():
    net, _ = build_tiny("qwen3_vl")
    add_lora(net, rank=2, alpha=4.0)
    names = [n for n, _ in trainable_parameters(net)]
    assert names and all(is_lora_key(n) for n in names)
    # q, k, v, o, gate, up, down per layer: A (r, in) + B (rows, r); C = 64, H * D = 64, Hkv * D = 32, MLP 128
    C, q, kv, F, r, L = 64, 64, 32, 128, 2, 2
    per_layer = r * ((C + q) + 2 * (C + kv) + (q + C) + 2 * (C + F) + (F + C))
    assert sum(p.numel() for _, p in trainable_parameters(net)) == L * per_layer


# ----------------------------------------------------------------------------- training changes the adapters only

@pytest.mark.parametrize("arch", ARCHS)
def test_a_step_changes_only_adapters(arch):
    net, proc = build_tiny(arch)
    add_lora(net, rank=4, alpha=8.0, seed=1)
    before = snapshot(net)
    opt = torch.optim.AdamW([p for _, p in trainable_parameters(net)], lr=1e-2, weight_decay=0.0)
    one_step(net, proc, opt)
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if ".lora_B." in k}  # B = 0 at step 1: only B has a gradient for A
    one_step(net, proc, opt, seed=1)
    changed = {k for k in before if not torch.equal(before[k], net.state_dict()[k])}
    assert changed == {k for k in before if is_lora_key(k)}
    assert len(opt.state) == len(trainable_parameters(net))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("lora", [False, True])
def test_freeze_vision_leaves_the_tower_untouched(arch, lora):
    net, proc = build_tiny(arch)
    if lora:
        add_lora(net, rank=4, alpha=8.0)
        randomize_adapters(net)
    n_vision = freeze_vision(net)
    assert n_vision == sum(p.numel() for p in net.visual.parameters()) > 0
    assert not any(p.requires_grad for p in net.visual.parameters())
    before = snapshot(net)
    opt = torch.optim.AdamW([p for _, p in trainable_parameters(net)], lr=1e-2)
    one_step(net, proc, opt)
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any(k.startswith("visual.") for k in changed)
    if lora:
        assert changed == {k for k in before if is_lora_key(k)}
    else:  # full fine-tune of the decoder: every decoder tensor moved
        assert {k for k in before if k.startswith("language_model.layers.")} <= changed
    # optimizer state only for what trains
    assert sum(s["exp_avg"].numel() for s in opt.state.values()) == \
        sum(p.numel() for _, p in trainable_parameters(net))


def test_freeze_vision_refuses_vision_adapters():
    net, _ = build_tiny("qwen3_vl")
    add_lora(net, rank=2, alpha=2.0, vision=True)
    with pytest.raises(ValueError, match="vision tower"):
        freeze_vision(net)


# ----------------------------------------------------------------------------- the reference policy for free

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shared", [True, False])
def test_adapters_disabled_equals_a_separately_loaded_base(arch, shared, tmp_path):
    net, proc = build_tiny(arch)
    model.save(net, tmp_path / "base")
    add_lora(net, rank=4, alpha=8.0, vision=True)
    randomize_adapters(net)
    base = model.load(tmp_path / "base")
    prompts = make_prompts(proc)[:3]
    ids, mask = responses()
    with torch.no_grad():
        want = training_logprobs(base, prompts, ids, mask, shared)
        policy = training_logprobs(net, prompts, ids, mask, shared)
        with adapters_disabled(net):
            ref = training_logprobs(net, prompts, ids, mask, shared)
        again = training_logprobs(net, prompts, ids, mask, shared)
    assert torch.equal(ref, want)
    assert (policy - want).abs().max() > 1e-3  # the adapters matter...
    assert torch.equal(again, policy)  # ...and are back on after the block


def test_adapters_disabled_refuses_a_merged_model():
    net, _ = build_tiny("qwen3_vl")
    add_lora(net, rank=2, alpha=2.0)
    merge_lora(net)
    with pytest.raises(ValueError, match="merged"):
        with adapters_disabled(net):
            pass


# ----------------------------------------------------------------------------- targets

def test_q_target_adapts_only_the_q_rows():
    net, proc = build_tiny("qwen3_vl")
    add_lora(net, rank=4, alpha=8.0, targets="q,down")
    randomize_adapters(net)
    assert lora_config(net)["targets"] == ["q", "down"]
    layer = net.language_model.layers[0]
    qkv = layer.self_attn.qkv_proj
    assert isinstance(qkv, LoRALinear) and list(qkv.lora_A) == ["q_proj"]
    assert not isinstance(layer.self_attn.o_proj, LoRALinear) and not isinstance(layer.mlp.gate_up_proj, LoRALinear)
    q_rows = dict(qkv.parts)["q_proj"]
    delta = qkv.delta()
    assert bool(delta[:q_rows].abs().sum() > 0) and bool((delta[q_rows:] == 0).all())
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        y = qkv(x)
        with adapters_disabled(net):
            y0 = qkv(x)
    assert torch.equal(y[..., q_rows:], y0[..., q_rows:])  # k and v rows: the base layer, bit for bit
    assert not torch.equal(y[..., :q_rows], y0[..., :q_rows])


def test_targets_are_checked():
    assert check_targets("down, q ,k") == ("q", "k", "down")
    for bad in ("q,x", "", ["qkv"]):
        with pytest.raises(ValueError, match="LoRA targets"):
            check_targets(bad)
    net, _ = build_tiny("qwen3_vl")
    with pytest.raises(ValueError, match="rank"):
        add_lora(net, rank=0, alpha=1.0)
    add_lora(net, rank=1, alpha=1.0)
    with pytest.raises(ValueError, match="already"):
        add_lora(net, rank=1, alpha=1.0)


def test_qwen3_vision_mlp_has_no_gate():
    """Qwen3-VL's ViT MLP is fc1 -> GELU -> fc2: "up" adapts linear_fc1, "down" linear_fc2, "gate" nothing."""
    net, _ = build_tiny("qwen3_vl")
    add_lora(net, rank=2, alpha=2.0, targets="gate,up,down", vision=True)
    mlp = net.visual.blocks[0].mlp
    assert isinstance(mlp.linear_fc1, LoRALinear) and isinstance(mlp.linear_fc2, LoRALinear)
    assert not isinstance(net.visual.blocks[0].attn.qkv, LoRALinear)
    assert lora_config(net) == {"rank": 2, "alpha": 2.0, "targets": ["gate", "up", "down"], "vision": True}


# ----------------------------------------------------------------------------- merging and the merged export

@pytest.mark.parametrize("arch", ARCHS)
def test_merge_equals_adapters_and_unmerge_restores(arch):
    net, proc = build_tiny(arch)
    add_lora(net, rank=4, alpha=8.0, vision=True)
    randomize_adapters(net)
    p = image_prompt(proc)
    want = logits_of(net, p)
    weights = {n: m.weight.detach().clone() for n, m in lora_modules(net)}
    with merged(net):
        assert all(m.merged for _, m in lora_modules(net))
        got = logits_of(net, p)
    assert (got - want).abs().max() <= 1e-5
    for n, m in lora_modules(net):  # back to W up to one fp32 rounding per element
        err = (m.weight - weights[n]).abs()
        assert float(err.max()) <= 2 * torch.finfo(torch.float32).eps * float(weights[n].abs().max() + 1)
        assert not m.merged
    merge_lora(net)
    merge_lora(net)  # idempotent
    assert (logits_of(net, p) - want).abs().max() <= 1e-5
    unmerge_lora(net)
    assert (logits_of(net, p) - want).abs().max() <= 1e-5
