"""runtime/memory_plan.py: its closed-form parameter counts equal the models built on the meta device (the Qwen3-VL
presets and both tiny architectures, full and LoRA), its byte formulas give hand-computed numbers, the CLI runs.
Run: .venv/bin/python -m pytest -q tests/test_memory_plan.py
"""
import pytest
import torch

from runtime import memory_plan
import model
from conftest import build_tiny
from runtime.memory_plan import GiB, Options, param_counts, plan, qwen3vl_preset
from model.lora import add_lora, trainable_parameters


def counted(cfg, cls, **lora) -> dict:
    """The same parts as param_counts, counted on a model built on the meta device (no memory)."""
    with torch.device("meta"):
        net = cls(cfg)
    if lora:
        add_lora(net, alpha=1.0, **lora)
    lm = net.language_model
    return {"total": sum(p.numel() for p in net.parameters()),
            "trainable": sum(p.numel() for _, p in trainable_parameters(net)) if lora else None,
            "vision": sum(p.numel() for n, p in net.visual.named_parameters() if ".lora_" not in n),
            "decoder_blocks": sum(p.numel() for n, p in lm.layers.named_parameters() if ".lora_" not in n),
            "decoder_linear": sum(p.numel() for m in lm.layers.modules() if isinstance(m, torch.nn.Linear)
                                  for n, p in m.named_parameters(recurse=False))}


CASES = [("qwen3-vl-2b", {}), ("qwen3-vl-4b", {}), ("qwen3-vl-8b", {}),
         ("qwen3-vl-8b", dict(rank=8)), ("qwen3-vl-2b", dict(rank=16, targets="q,v", vision=True)),
         ("qwen3_vl", dict(rank=4, vision=True)), ("qwen2_5_vl", dict(rank=4, vision=True)),
         ("qwen2_5_vl", dict(rank=2, targets="gate,down,k")), ("qwen2_5_vl", {})]


@pytest.mark.parametrize("name,lora", CASES)
def test_param_counts_equal_the_meta_model(name, lora):
    if name.startswith("qwen3-vl-"):
        cfg, cls = qwen3vl_preset(name), model.Qwen3VL
    else:
        net, _ = build_tiny(name)
        cfg, cls = net.config, type(net)
    want = counted(cfg, cls, **lora)
    n = param_counts(cfg, lora.get("rank", 0), lora.get("targets", "q,k,v,o,gate,up,down"), lora.get("vision", False))
    base = n["decoder_blocks"] + n["embed"] + n["lm_head"] + n["final_norm"] + n["vision"]
    assert base + n["adapters"] == want["total"]
    assert n["vision"] == want["vision"] and n["decoder_blocks"] == want["decoder_blocks"]
    assert n["decoder_linear"] == want["decoder_linear"]
    if lora:
        assert n["adapters"] == want["trainable"]


def test_preset_sizes_are_the_releases():
    """Qwen3-VL-2B / 4B / 8B: 2.13B, 4.44B, 8.77B parameters (the model cards' sizes)."""
    sizes = {}
    for name in ("qwen3-vl-2b", "qwen3-vl-4b", "qwen3-vl-8b"):
        n = param_counts(qwen3vl_preset(name))
        sizes[name] = round((n["decoder_blocks"] + n["embed"] + n["lm_head"] + n["final_norm"] + n["vision"]) / 1e9, 2)
    assert sizes == {"qwen3-vl-2b": 2.13, "qwen3-vl-4b": 4.44, "qwen3-vl-8b": 8.77}
    # LoRA r=8 on all seven projections of the 8B decoder, by hand: per layer 8 * (C+q + 2(C+kv) + q+C + 2(C+F) + F+C)
    C, q, kv, F = 4096, 4096, 1024, 12288
    per_layer = 8 * ((C + q) + 2 * (C + kv) + (q + C) + 2 * (C + F) + (F + C))
    assert per_layer == 606_208
    assert param_counts(qwen3vl_preset("qwen3-vl-8b"), 8)["adapters"] == 36 * per_layer == 21_823_488


def test_bytes_by_hand():
    cfg = qwen3vl_preset("qwen3-vl-2b")
    n = param_counts(cfg)
    N = n["decoder_blocks"] + n["embed"] + n["lm_head"] + n["final_norm"] + n["vision"]
    linear = n["decoder_linear"] + cfg.text.vocab_size * cfg.text.hidden_size
    full = plan(cfg, Options())
    assert (full["weights"], full["gradients"], full["optimizer"], full["reference"]) == (4 * N, 4 * N, 8 * N, 2 * N)
    assert full["engine_copies"] == 2 * linear  # one engine (train.py evaluates with the rollout's) holds copies
    assert full["held"] == 4 * N + 8 * N + 2 * N + 2 * linear and full["peak"] == full["held"] + 4 * N
    # activations of 16 rows x 4096 + 2 prompts x 1024 positions: 28 blocks keeping T (2q + 2kv + 3C + 4F) bf16 values
    # each, or with checkpointing their inputs T C and one block's; the head's 512-position fp32 chunks
    t = cfg.text
    T, C, F, q, kv = 16 * 4096 + 2 * 1024, 2048, 6144, 16 * 128, 8 * 128
    block, head = T * (2 * q + 2 * kv + 3 * C + 4 * F) * 2, 512 * t.vocab_size * 4 * 3
    assert full["activations"] == 28 * block + head and full["with_activations"] == full["peak"] + 28 * block + head
    ckpt = plan(cfg, Options(activation_checkpointing=True))
    assert ckpt["activations"] == 28 * T * C * 2 + block + head
    assert plan(cfg, Options(micro_batch_tokens=8192, activation_checkpointing=True))["activations"] == \
        28 * 8192 * C * 2 + 8192 * (2 * q + 2 * kv + 3 * C + 4 * F) * 2 + head
    frozen = plan(cfg, Options(freeze_vision=True))
    assert frozen["optimizer"] == 8 * (N - n["vision"]) and frozen["weights"] == 4 * N
    ddp = plan(cfg, Options(world_size=8))
    assert ddp["gradients"] == 2 * 4 * N  # gradients + DDP's buckets
    fsdp = plan(cfg, Options(world_size=8, fsdp=True))
    # the engine's whole bf16 copy (graphs under FSDP2) is held; its refresh gathers one unit at a time, the root
    # (everything outside the decoder blocks) the largest
    root = N - n["decoder_blocks"]
    assert (fsdp["weights"], fsdp["optimizer"], fsdp["engine_copies"]) == (4 * N / 8, 8 * N / 8, 2 * N)
    assert fsdp["fsdp_rollout"] == 2 * root and fsdp["reference"] == 2 * N / 8  # sharded like the policy
    lora = plan(cfg, Options(lora_rank=8, base_dtype="bf16"))
    A = param_counts(cfg, 8)["adapters"]
    assert (lora["weights"], lora["optimizer"], lora["reference"], lora["engine_copies"]) == \
        (4 * A + 2 * N, 8 * A, 0, 0)
    # KV: 28 layers x 8 kv heads x 128 x (k, v) x bf16 = 112 KiB a token
    assert full["kv_per_token"] == 28 * 8 * 128 * 2 * 2 == 112 * 1024


def test_fsdp_update_phases_and_freed_engine_copies():
    """Under FSDP2 the engine's whole bf16 copy is given back for the update (auto), so it is a rollout extra, not
    held; the update's peak is the larger of the backward's start (activations, the root and two blocks unsharded, the
    LM head's and one block's gradients) and its end (the root's gradients in bf16 and fp32, no activations)."""
    cfg = qwen3vl_preset("qwen3-vl-8b")
    kw = dict(world_size=4, fsdp=True, max_new_tokens=4096, prompt_len=2048, micro_batch_size=16,
              activation_checkpointing=True)
    freed, kept = plan(cfg, Options(**kw)), plan(cfg, Options(**kw, free_rollout_memory="false"))
    n = freed["params"]
    N, V, C = n["total"], cfg.text.vocab_size, cfg.text.hidden_size
    root, block = N - n["decoder_blocks"], n["block"]
    assert freed["held"] == 4 * N / 4 + 8 * N / 4 + 2 * N / 4 and kept["held"] == freed["held"] + 2 * N
    assert freed["peak"] == freed["held"] + max(4 * N / 4 + 2 * (root + 2 * block) + 6 * (root + block),
                                                2 * root + 2 * N)
    start = 2 * (root + 2 * block) + 6 * block + 2 * V * C
    assert freed["fsdp_update_start"] == start
    assert freed["with_activations"] == freed["held"] + 4 * N / 4 + max(start + freed["activations"],
                                                                          freed["fsdp_update"])
    assert kept["with_activations"] - freed["with_activations"] == 2 * N
    # the point: the paper's setting (4 GPUs, micro-batch 16, responses up to 4,096, checkpointing) fits 80 GiB
    assert freed["with_activations"] < 80 * GiB < kept["with_activations"]
    assert plan(cfg, Options(**kw, free_rollout_memory="true"))["with_activations"] == freed["with_activations"]
    one = plan(cfg, Options(free_rollout_memory="true"))  # one GPU: the bf16 copies of the linear layers
    assert one["held"] == plan(cfg, Options())["held"] - one["engine_copies"]


def test_one_gpu_verdicts():
    """The point of the issue: an 8B full fine-tune does not fit one 80 GiB GPU, LoRA on a bf16 base does."""
    cfg = qwen3vl_preset("qwen3-vl-8b")
    assert plan(cfg, Options())["peak"] > 80 * GiB
    assert plan(cfg, Options(lora_rank=8, base_dtype="bf16"))["peak"] < 20 * GiB


def test_cli_and_table(tmp_path, capsys):
    net, _ = build_tiny("qwen2_5_vl")
    model.save(net, tmp_path / "ckpt")
    memory_plan.main([f"--model={tmp_path / 'ckpt'}", "--lora_rank=4", "--lora_targets=q,v", "--world_size=2",
                      "--fsdp"])
    out = capsys.readouterr().out
    assert "LoRA r=4 (q,v; base fp32), 2 GPUs, FSDP2" in out and "fits" in out
    memory_plan.main(["--table"])
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == 2 + 3 * len(memory_plan.TABLE_ROWS)
    with pytest.raises(ValueError, match="unknown preset"):
        qwen3vl_preset("qwen3-vl-7b")
