"""LoRA on disk (model/lora.py): the merged export equals base + adapters and loads in transformers with the same
logits; adapter files round-trip exactly, are checked, and resume a run exactly. Tiny random models, fp32, CPU.
"""
import json

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

import model
from conftest import build_tiny
from lora_kit import ARCHS, image_prompt, logits_of, one_step, randomize_adapters
from model.lora import (ADAPTER_CONFIG, add_lora, load_adapters, lora_modules, lora_state_dict, merged,
                        merged_state_dict, save_adapters, save_merged, trainable_parameters)
from runtime import checkpoints

HF_CLASS = {"qwen3_vl": Qwen3VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}


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
