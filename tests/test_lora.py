"""model/lora.py on tiny random Qwen3-VL / Qwen2.5-VL models (fp32, CPU): with B = 0 the model is the base model
bit for bit; after an optimizer step only adapter tensors changed (and with freeze_vision no vision tensor); with
adapters disabled the log-probs are a separately loaded base model's, on the plain and the shared-prefix forward;
merged weights equal base + adapters and load in transformers with the same logits; adapter files round-trip
exactly and resume a run exactly; the rollout engine samples with the adapters active.
Run: .venv/bin/python -m pytest -q tests/test_lora.py
"""
import json

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

import model
from runtime import checkpoints
from conftest import STOP, build_tiny, make_prompts
from model.processor import left_pad
from rollout.randomness import row_keys
from rollout.engine import Engine
from model.lora import (ADAPTER_CONFIG, LoRALinear, adapters_disabled, add_lora, check_targets, freeze_vision,
                        is_lora_key, load_adapters, lora_config, lora_modules, lora_state_dict, merge_lora, merged,
                        merged_state_dict, save_adapters, save_merged, trainable_parameters, unmerge_lora)
from model.prefix import grouped_logits
from oracle import check_step_compiles
from tokenprobs import token_logprobs

ARCHS = ("qwen3_vl", "qwen2_5_vl")
HF_CLASS = {"qwen3_vl": Qwen3VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}


# ----------------------------------------------------------------------------- helpers

def randomize_adapters(net, seed=0, scale=0.05):
    """Adapters as after some training: B != 0 too, so every path through them shows in the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if is_lora_key(name):
                p.copy_(scale * torch.randn(p.shape, generator=gen))
    return net


def image_prompt(proc):
    return make_prompts(proc)[2]  # two images, so both towers run more than one segment


@torch.no_grad()
def logits_of(net, p):
    return net(p["input_ids"][None], pixel_values=p["pixel_values"], image_grid_thw=p["image_grid_thw"])


def responses(n_rows=6, R=7, vocab=300, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(50, vocab, (n_rows, R), generator=gen)
    mask = torch.ones(n_rows, R)
    mask[1, 4:] = 0  # rows of different lengths
    mask[4, 2:] = 0
    return ids, mask


def training_logprobs(net, prompts, ids, mask, shared: bool):
    """Response log-probs (B, R) of rows 2 per prompt: the shared-prefix forward, or one row per [prompt | response]."""
    prompt_index = torch.arange(len(prompts)).repeat_interleave(ids.shape[0] // len(prompts))
    if shared:
        prompt_ids, prompt_mask, pixels, grid = left_pad(prompts, 0, "cpu")
        logits, _ = grouped_logits(net, prompt_ids, prompt_mask, pixels, grid, ids, mask, prompt_index)
        return token_logprobs(logits, ids) * mask
    out = []
    for r, i in enumerate(prompt_index.tolist()):
        n = int(mask[r].sum())
        full = torch.cat([prompts[i]["input_ids"], ids[r, :n]])[None]
        logits = net(full, pixel_values=prompts[i].get("pixel_values"), image_grid_thw=prompts[i].get("image_grid_thw"))
        lp = token_logprobs(logits[:, -n - 1:-1], ids[r:r + 1, :n])[0]
        out.append(torch.cat([lp, lp.new_zeros(ids.shape[1] - n)]))
    return torch.stack(out)


def one_step(net, proc, optimizer, seed=0):
    """One AdamW update on a loss through both forwards (shared-prefix and plain, images included)."""
    prompts = make_prompts(proc)[:3]
    ids, mask = responses(seed=seed)
    net.train()
    loss = -(training_logprobs(net, prompts, ids, mask, shared=True).sum()
             + training_logprobs(net, prompts[:1], ids[:2], mask[:2], shared=False).sum())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    net.eval()


def snapshot(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


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


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_checkpoint_equals_adapters_and_loads_in_transformers(arch, tmp_path):
    net, proc = build_tiny(arch)
    add_lora(net, rank=4, alpha=8.0, vision=True)
    randomize_adapters(net)
    p = image_prompt(proc)
    want = logits_of(net, p)
    save_merged(net, tmp_path / "merged")
    assert sorted(f.name for f in (tmp_path / "merged").iterdir()) == ["config.json", "model.safetensors"]
    ours = model.load(tmp_path / "merged")
    assert not lora_modules(ours)
    assert (logits_of(ours, p) - want).abs().max() <= 1e-5
    hf, info = HF_CLASS[arch].from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = p["input_ids"][None]
    with torch.no_grad():
        got = hf.eval()(input_ids=ids, pixel_values=p["pixel_values"], image_grid_thw=p["image_grid_thw"],
                        mm_token_type_ids=(ids == net.config.image_token_id).int()).logits
    assert (got - want).abs().max() <= 1e-4  # transformers' own kernels (tests/test_checkpoint.py's tolerance)
    # from a full state dict (as gathered from FSDP2), and with the weights merged in place: the same tensors
    sd = merged_state_dict(net)
    assert sd.keys() == ours.state_dict().keys()
    assert all(torch.equal(sd[k], v) for k, v in merged_state_dict(net, net.state_dict()).items())
    with merged(net):
        assert all((merged_state_dict(net)[k] - v).abs().max() <= 1e-6 for k, v in sd.items())


# ----------------------------------------------------------------------------- adapter files

@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_round_trip_is_exact(arch, tmp_path):
    net, proc = build_tiny(arch)
    add_lora(net, rank=4, alpha=8.0, targets="q,v,down", vision=True)
    randomize_adapters(net)
    save_adapters(net, tmp_path / "ad", base_model="tiny")
    cfg = json.loads((tmp_path / "ad" / ADAPTER_CONFIG).read_text())
    assert cfg == {"format": "safegrpo-lora-1", "rank": 4, "alpha": 8.0, "targets": ["q", "v", "down"],
                   "vision": True, "base_model": "tiny"}
    fresh, _ = build_tiny(arch)
    load_adapters(fresh, tmp_path / "ad")
    a, b = lora_state_dict(net), lora_state_dict(fresh)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    p = image_prompt(proc)
    assert torch.equal(logits_of(fresh, p), logits_of(net, p))
    assert [n for n, _ in trainable_parameters(fresh)] == [n for n, _ in trainable_parameters(net)]
    # into a model that already has the same adapters: in place (the parameters keep their storage)
    ptr = {n: p.data_ptr() for n, p in fresh.named_parameters()}
    load_adapters(fresh, tmp_path / "ad")
    assert ptr == {n: p.data_ptr() for n, p in fresh.named_parameters()}


def test_adapter_files_are_checked(tmp_path):
    net, _ = build_tiny("qwen3_vl")
    with pytest.raises(ValueError, match="no LoRA"):
        save_adapters(net, tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="adapter config"):
        load_adapters(net, tmp_path)
    add_lora(net, rank=4, alpha=8.0)
    save_adapters(net, tmp_path / "ad")
    other, _ = build_tiny("qwen3_vl")
    add_lora(other, rank=2, alpha=8.0)
    with pytest.raises(ValueError, match="do not match"):
        load_adapters(other, tmp_path / "ad")


def test_resume_from_adapters_repeats_the_uninterrupted_run(tmp_path):
    """Two AdamW steps in one go == one step, adapters + optimizer state written (safetensors only) and read into
    a fresh model, then the second step: the same adapters, bit for bit."""
    def fresh():
        net, proc = build_tiny("qwen3_vl")
        add_lora(net, rank=4, alpha=8.0, seed=7)
        return net, proc, torch.optim.AdamW([p for _, p in trainable_parameters(net)], lr=1e-2)

    net, proc, opt = fresh()
    one_step(net, proc, opt, seed=0)
    one_step(net, proc, opt, seed=1)
    want = lora_state_dict(net)

    net, proc, opt = fresh()
    one_step(net, proc, opt, seed=0)
    save_adapters(net, tmp_path / "ad")
    tensors, meta = checkpoints.optimizer_to_files(opt.state_dict())
    from safetensors.torch import load_file, save_file
    save_file(tensors, str(tmp_path / "opt.safetensors"))

    net, proc, opt = fresh()
    randomize_adapters(net, seed=9)  # whatever was there is overwritten
    load_adapters(net, tmp_path / "ad")
    opt.load_state_dict(checkpoints.optimizer_from_files(load_file(str(tmp_path / "opt.safetensors")), meta))
    one_step(net, proc, opt, seed=1)
    got = lora_state_dict(net)
    assert all(torch.equal(got[k], want[k]) for k in want)


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
                assert kept.state.copies and not any(".lora_" in n for n in kept.state.copies)
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
    eng = Engine(net, buckets=True)
    eng.generate(prompts, group_size=3, max_new_tokens=12, stop_token_ids=STOP)
    st = eng.state
    st.reset()
    st.is_stop[:len(STOP)] = True
    st.admit(list(range(len(prompts))), prompts, row_keys(0, len(prompts), 3), 0)
    st.rows, st.length = len(prompts) * 3, 12
    check_step_compiles(st)


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
        assert not eng.state.copies
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
