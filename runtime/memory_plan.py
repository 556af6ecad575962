"""Memory planner: the bytes one GPU holds in a SafeGRPO run (weights, gradients, AdamW state, reference model,
rollout weight copies, FSDP2 working sets), for a model config, full fine-tune or LoRA, DDP or FSDP2, before launch.

    python -m runtime.memory_plan --model=qwen3-vl-8b --lora_rank=8            # a preset, one GPU
    python -m runtime.memory_plan --model=/ckpt/Qwen3-VL-8B-Thinking --world_size=8 --fsdp
    python -m runtime.memory_plan --table                                      # the README table
Tests: .venv/bin/python -m pytest -q tests/test_memory_plan.py
"""
import argparse
from dataclasses import dataclass

from config import frees_rollout_memory
from model.config import Qwen2_5_VisionConfig, Qwen3VLConfig, TextConfig, VisionConfig
from model.lora import ALL_TARGETS, check_targets

GiB = 2 ** 30
BYTES = {"fp32": 4, "bf16": 2}


# ----------------------------------------------------------------------------- presets

def qwen3vl_preset(name: str) -> Qwen3VLConfig:
    """Qwen3-VL-2B / 4B / 8B from their published config.json shapes (token ids: the releases')."""
    key = name.lower().replace("_", "-").removeprefix("qwen3-vl-")
    shapes = {  # text: hidden, layers, heads, kv heads, MLP, tied; vision: depth, width, MLP, DeepStack taps
        "2b": (2048, 28, 16, 8, 6144, True, 24, 1024, 4096, (5, 11, 17)),
        "4b": (2560, 36, 32, 8, 9728, True, 24, 1024, 4096, (5, 11, 17)),
        "8b": (4096, 36, 32, 8, 12288, False, 27, 1152, 4304, (8, 16, 24)),
    }
    if key not in shapes:
        raise ValueError(f"unknown preset {name!r}: use qwen3-vl-2b, qwen3-vl-4b, qwen3-vl-8b or a checkpoint dir")
    C, L, H, Hkv, F, tied, depth, width, vmlp, taps = shapes[key]
    text = TextConfig(vocab_size=151936, hidden_size=C, intermediate_size=F, num_hidden_layers=L,
                      num_attention_heads=H, num_key_value_heads=Hkv, head_dim=128, rope_theta=5_000_000.0,
                      mrope_section=(24, 20, 20), max_position_embeddings=262144)
    vision = VisionConfig(depth=depth, hidden_size=width, intermediate_size=vmlp, num_heads=16, patch_size=16,
                          out_hidden_size=C, num_position_embeddings=2304, deepstack_visual_indexes=taps)
    return Qwen3VLConfig(text=text, vision=vision, tie_word_embeddings=tied)


def load_model_config(model: str):
    """A preset name, or a checkpoint directory (its config.json)."""
    if model.lower().replace("_", "-").startswith("qwen3-vl-"):
        return qwen3vl_preset(model)
    from model.checkpoint import read_config
    return read_config(model)[1]


# ----------------------------------------------------------------------------- parameter counts

def param_counts(cfg, lora_rank: int = 0, lora_targets=ALL_TARGETS, lora_vision: bool = False) -> dict:
    """Parameters by part, closed form (tests/test_memory_plan.py checks them against the model built on the meta
    device). Text: C hidden, L layers, q = H*D, kv = Hkv*D, F MLP, V vocab; vision: c width, f MLP, M = c*merge^2.
      decoder block = C(q + 2kv) + qC + 3CF + 2C [+ 2D q/k norms (Qwen3)] [+ q + 2kv q/k/v biases (Qwen2.5)]
      embed = VC; lm_head = VC unless tied; final norm = C
      adapter on a projection (in -> rows) = r (in + rows): q r(C + q), k and v r(C + kv), o r(q + C),
      gate and up r(C + F), down r(F + C); in a ViT block q, k, v, o r(2c), up and down (and gate) r(c + f)."""
    t, v = cfg.text, cfg.vision
    C, L, F, V, D = t.hidden_size, t.num_hidden_layers, t.intermediate_size, t.vocab_size, t.head_dim
    q, kv = t.num_attention_heads * D, t.num_key_value_heads * D
    linear = C * (q + 2 * kv) + q * C + 3 * C * F + (q + 2 * kv) * t.qkv_bias + C * t.o_bias  # nn.Linear tensors
    block = linear + 2 * C + 2 * D * t.qk_norm
    c, f, m2 = v.hidden_size, v.intermediate_size, v.spatial_merge_size ** 2
    M, out, patch = c * m2, v.out_hidden_size, v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    attn = c * 3 * c + 3 * c + c * c + c
    merger_mlp = M * M + M + M * out + out
    if isinstance(v, Qwen2_5_VisionConfig):  # RMSNorm + SwiGLU blocks, no position table, one merger
        vision_block = attn + 2 * c * f + 2 * f + f * c + c + 2 * c
        vision_rest = patch * c + c + merger_mlp
        vision_mlp = {"gate": c + f, "up": c + f, "down": f + c}
    else:  # Qwen3-VL: LayerNorm + GELU MLP blocks, learned positions, merger + DeepStack mergers
        vision_block = attn + c * f + f + f * c + c + 4 * c
        vision_rest = patch * c + c + v.num_position_embeddings * c + (2 * c + merger_mlp) + \
            len(v.deepstack_visual_indexes) * (2 * M + merger_mlp)
        vision_mlp = {"up": c + f, "down": f + c}
    targets = check_targets(lora_targets) if lora_rank else ()
    text_in_out = {"q": C + q, "k": C + kv, "v": C + kv, "o": q + C, "gate": C + F, "up": C + F, "down": F + C}
    vision_in_out = {"q": 2 * c, "k": 2 * c, "v": 2 * c, "o": 2 * c, **vision_mlp}
    adapters_text = lora_rank * L * sum(text_in_out[x] for x in targets)
    adapters_vision = lora_rank * v.depth * sum(vision_in_out.get(x, 0) for x in targets) if lora_vision else 0
    return {"decoder_blocks": L * block, "block": block, "decoder_linear": L * linear, "embed": V * C,
            "lm_head": 0 if cfg.tie_word_embeddings else V * C, "final_norm": C,
            "vision": v.depth * vision_block + vision_rest, "adapters_text": adapters_text,
            "adapters_vision": adapters_vision, "adapters": adapters_text + adapters_vision}


# ----------------------------------------------------------------------------- the plan

@dataclass
class Options:
    lora_rank: int = 0             # 0: full fine-tune (the paper's)
    lora_targets: tuple = ALL_TARGETS
    lora_vision: bool = False      # adapters on the ViT blocks too
    freeze_vision: bool = False    # full fine-tune: the vision tower gets no gradient / optimizer state
    world_size: int = 1
    fsdp: bool = False             # FSDP2 (params, grads, optimizer sharded over world_size) instead of DDP
    base_dtype: str = "fp32"       # storage of frozen weights (the LoRA base, a frozen tower): fp32 | bf16
    kl: bool = True                # a KL term (full fine-tune: a reference copy; LoRA: adapters disabled)
    engines: int = 1               # rollout engines holding weight copies (train.py: one, rollouts and evaluation)
    gpu_gb: float = 80.0           # GPU memory, GiB
    group_size: int = 8            # for the hints: G, response budget, prompt length, micro-batch rows
    max_new_tokens: int = 4096
    prompt_len: int = 1024
    micro_batch_size: int = 16
    micro_batch_tokens: int = 0    # micro-batches packed by tokens (train.py --micro_batch_tokens); 0: micro_batch_size
    activation_checkpointing: bool = False  # recompute decoder blocks in backward: keep only their inputs
    free_rollout_memory: str = "auto"  # the engine's weight copies given back for the update (train.py's flag):
                                       # auto (under FSDP2) | true | false


def plan(cfg, opt: Options) -> dict:
    """Per-GPU bytes, by item and phase. With N_t trainable and N_f frozen parameters, S = world_size under FSDP2
    (else 1), b_f = bytes of a frozen weight (fp32 4, bf16 2):
      weights = 4 N_t / S + b_f N_f / S          (fp32 master weights; bf16 compute comes from autocast)
      gradients = 4 N_t / S  (+ 4 N_t: DDP's gradient buckets, world_size > 1 without FSDP2)
      optimizer = 8 N_t / S                      (AdamW exp_avg + exp_avg_sq, fp32)
      reference = 2 N / S  (full fine-tune with KL: parallel.build_reference's bf16 copy, sharded like the policy
                        under FSDP2; LoRA: 0, the policy with its adapters disabled)
      engine copies = engines * 2 * (decoder linear + lm_head weights)   (rollout/weights.py keeps bf16 copies of the
                        linear layers when they are stored fp32; none with a bf16 LoRA base);
                      under FSDP2: engines * 2 N, a whole bf16 copy of the weights at fixed addresses (refreshed
                        from the shards before each rollout) that the CUDA graphs replay over
      FSDP2 rollout = 2 R  (the refresh gathers one FSDP unit at a time: the largest is the root R, everything outside
                        the decoder blocks)
      FSDP2 update = 2 (R + 2 B) + 6 (R_t + B_t)  (bf16 unsharded root R = everything outside the decoder blocks,
                        kept through forward and backward, and two blocks B (one prefetched); their gradients in
                        bf16 and fp32 for the reduce-scatter: the root's at the end of the backward, when the
                        activations are gone)
      FSDP2 update start = 2 (R + 2 B) + 6 B_t + 2 V C_t  (the start of the backward, when the activations peak: the
                        root and two blocks unsharded, the LM head's bf16 gradient (made first, reduced with the
                        root's at the end; V C_t = V C when the head or the tied embedding trains) and a block's)
      activations (the update, bf16): a micro-batch's T positions (micro_batch_tokens; else its rows' responses at
                        max_new_tokens and its prompts once each, the shared-prefix forward) through L blocks that
                        each keep ~T (2q + 2kv + 3C + 4F) values for the backward (q, k, v, attention out, norms,
                        residual, the MLP's gate, up, activation and product); with activation checkpointing only
                        the L block inputs T C and one block's recompute; plus the LM head's chunked log-probs
                        (512 positions x V, fp32, three buffers; no whole logits, logprobs.head_logprobs)
    held = weights + optimizer + reference, + engine copies unless they are given back for the update (then they are
    rollout extras); peak = held + max(update extras, rollout extras), before activations; with them = held +
    gradients + update extras + activations (FSDP2: + max(update start + activations, update)); the KV cache gets
    what is left during the rollout (train.py frees it for the update too when it frees the copies)."""
    n = param_counts(cfg, opt.lora_rank, opt.lora_targets, opt.lora_vision)
    base = n["decoder_blocks"] + n["embed"] + n["lm_head"] + n["final_norm"] + n["vision"]
    total = base + n["adapters"]
    if opt.lora_rank:
        trainable = n["adapters"]
    else:
        trainable = base - (n["vision"] if opt.freeze_vision else 0)
    frozen = total - trainable
    S = opt.world_size if opt.fsdp else 1
    ddp = opt.world_size > 1 and not opt.fsdp
    linear_fp32 = not opt.lora_rank or opt.base_dtype == "fp32"
    items = {
        "weights": (4 * trainable + BYTES[opt.base_dtype] * frozen) / S,
        "optimizer": 8 * trainable / S,
        "reference": 2 * base / S if opt.kl and not opt.lora_rank else 0,
        "engine_copies": opt.engines * 2 * total if opt.fsdp else
        opt.engines * 2 * (n["decoder_linear"] + cfg.text.vocab_size * cfg.text.hidden_size) if linear_fp32 else 0,
        "gradients": 4 * trainable / S + (4 * trainable if ddp else 0),
    }
    L = cfg.text.num_hidden_layers
    if opt.fsdp:  # the root group: everything outside the decoder blocks (fully_shard per block, then the root)
        root = total - n["decoder_blocks"] - n["adapters_text"]
        block = n["block"] + n["adapters_text"] // L
        root_t = n["adapters_vision"] if opt.lora_rank else trainable - n["decoder_blocks"]
        block_t = n["adapters_text"] // L if opt.lora_rank else n["block"]
        items["fsdp_update"] = 2 * (root + 2 * block) + 6 * (root_t + block_t)
        head_t = 0 if opt.lora_rank else cfg.text.vocab_size * cfg.text.hidden_size
        items["fsdp_update_start"] = 2 * (root + 2 * block) + 6 * block_t + 2 * head_t
        items["fsdp_rollout"] = 2 * max(root, block)
    else:
        items["fsdp_update"] = items["fsdp_update_start"] = items["fsdp_rollout"] = 0
    free = frees_rollout_memory(opt.free_rollout_memory, opt.fsdp)
    t = cfg.text
    C, F, q, kv = t.hidden_size, t.intermediate_size, t.num_attention_heads * t.head_dim, \
        t.num_key_value_heads * t.head_dim
    tokens = opt.micro_batch_tokens or \
        opt.micro_batch_size * opt.max_new_tokens + -(-opt.micro_batch_size // opt.group_size) * opt.prompt_len
    per_block = tokens * (2 * q + 2 * kv + 3 * C + 4 * F) * 2
    items["activations"] = (L * tokens * C * 2 + per_block if opt.activation_checkpointing else L * per_block) + \
        512 * t.vocab_size * 4 * 3
    held = items["weights"] + items["optimizer"] + items["reference"] + (0 if free else items["engine_copies"])
    update = items["gradients"] + items["fsdp_update"]
    rollout = items["fsdp_rollout"] + (items["engine_copies"] if free else 0)
    peak = held + max(update, rollout)
    with_activations = held + items["gradients"] + (max(items["fsdp_update_start"] + items["activations"],
                                                         items["fsdp_update"]) if opt.fsdp else items["activations"])
    kv_token = t.num_hidden_layers * t.num_key_value_heads * t.head_dim * 2 * 2  # k and v, bf16
    # engine.Engine.slot_bytes: the slot (bf16) plus the prompt's prefill cache, in the stored weights' dtype
    slot = kv_token * (opt.prompt_len + opt.group_size * opt.max_new_tokens) + \
        kv_token // 2 * (4 if linear_fp32 and not opt.fsdp else 2) * opt.prompt_len
    left = opt.gpu_gb * GiB - max(peak, with_activations)
    return {**items, "held": held, "peak": peak, "with_activations": with_activations, "left": left,
            "params": {"total": total, "trainable": trainable, "frozen": frozen, **n},
            "kv_per_token": kv_token, "kv_per_group": slot,
            "groups_that_fit": max(0, int((opt.gpu_gb * GiB - held - rollout) // slot)), "frees_engine": free,
            "micro_batch_positions": tokens}


def describe(opt: Options) -> str:
    mode = f"LoRA r={opt.lora_rank} ({','.join(check_targets(opt.lora_targets))}" + \
        (", vision" if opt.lora_vision else "") + f"; base {opt.base_dtype})" if opt.lora_rank else \
        "full fine-tune" + (" (vision frozen)" if opt.freeze_vision else "")
    par = "one GPU" if opt.world_size == 1 else f"{opt.world_size} GPUs, " + ("FSDP2" if opt.fsdp else "DDP")
    return f"{mode}, {par}"


def format_plan(name: str, cfg, opt: Options) -> str:
    """The plan as the lines --dry_run_memory prints."""
    p = plan(cfg, opt)
    g = lambda b: f"{b / GiB:8.2f} GiB"  # noqa: E731
    n = p["params"]
    lines = [f"memory plan per GPU: {name}, {describe(opt)}",
             f"  parameters: {n['total'] / 1e9:.3f}B, trainable {n['trainable'] / 1e6:.1f}M",
             f"  weights (fp32 master, frozen {opt.base_dtype}) {g(p['weights'])}",
             f"  optimizer (AdamW moments, fp32)      {g(p['optimizer'])}",
             f"  reference model                      {g(p['reference'])}"
             + ("   (adapters disabled: none)" if opt.lora_rank else ""),
             f"  rollout engine weight copies (bf16)  {g(p['engine_copies'])}"
             + ("   (the whole model: graphs under FSDP2)" if opt.fsdp else "")
             + ("; given back for the update, not held" if p["frees_engine"] else ""),
             f"  = held through the run               {g(p['held'])}",
             f"  + gradients during the update        {g(p['gradients'])}"]
    if opt.fsdp:
        lines += [f"  + FSDP2 unsharded units (update)     {g(p['fsdp_update'])}   (at the backward's end; at its "
                  f"start {p['fsdp_update_start'] / GiB:.2f} GiB)",
                  f"  + FSDP2 unit gathered (rollout copy) {g(p['fsdp_rollout'])}"]
    if p["frees_engine"]:
        lines += [f"  + engine copies (rollout)            {g(p['engine_copies'])}"]
    lines += [f"  = peak before activations            {g(p['peak'])}",
              f"  + activations of a micro-batch        {g(p['activations'])}   ({p['micro_batch_positions']:,} positions, "
              + ("checkpointed blocks)" if opt.activation_checkpointing else "no activation checkpointing)"),
              f"  = peak of the update                 {g(p['with_activations'])}   "
              + (("(held + gradients + units at the backward's start + activations) " if
                  p["fsdp_update_start"] + p["activations"] >= p["fsdp_update"] else "(at the backward's end) ")
                 if opt.fsdp else "") + f"of {opt.gpu_gb:.0f} GiB: "
              + ("fits" if p["left"] > 0 else "DOES NOT FIT"),
              f"  hints: KV cache {p['kv_per_token'] / 1024:.0f} KiB/token; one group of {opt.group_size} x "
              f"{opt.max_new_tokens} tokens after a {opt.prompt_len}-token prompt {g(p['kv_per_group']).strip()} "
              f"reserved whole, {p['groups_that_fit']} such groups in what is left during the rollout (the paged store "
              f"holds rows as their tokens grow: bench/kv_plan.py)"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the README table

TABLE_ROWS = [  # (GPUs, label, options)
    (1, "full", dict()),
    (1, "LoRA r=8", dict(lora_rank=8)),
    (1, "LoRA r=8, bf16 base", dict(lora_rank=8, base_dtype="bf16")),
    (8, "full, DDP", dict()),
    (8, "full, FSDP2", dict(fsdp=True)),
    (8, "LoRA r=8, DDP", dict(lora_rank=8)),
    (8, "LoRA r=8, bf16 base, DDP", dict(lora_rank=8, base_dtype="bf16")),
]


def readme_table(models=("qwen3-vl-2b", "qwen3-vl-4b", "qwen3-vl-8b"), gpu_gb: float = 80.0) -> str:
    """Markdown: per-GPU GiB for each preset on 1 and 8 GPUs, full fine-tune vs LoRA (all seven projections)."""
    head = "| model | GPUs | mode | trainable | weights | AdamW | reference | engine copies | held | + update | " \
           f"+ rollout | peak | fits {gpu_gb:.0f} GiB |"
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for name in models:
        cfg = qwen3vl_preset(name)
        for world, label, kw in TABLE_ROWS:
            opt = Options(world_size=world, gpu_gb=gpu_gb, **kw)
            p = plan(cfg, opt)
            f = lambda b: f"{b / GiB:.1f}"  # noqa: E731
            n_t = p["params"]["trainable"]
            out.append(f"| {name} | {world} | {label} | {n_t / 1e6:,.0f}M | {f(p['weights'])} | {f(p['optimizer'])} | "
                       f"{f(p['reference'])} | {f(p['engine_copies'])} | {f(p['held'])} | "
                       f"{f(p['gradients'] + p['fsdp_update'])} | "
                       f"{f(p['fsdp_rollout'] + (p['engine_copies'] if p['frees_engine'] else 0))} | {f(p['peak'])} | "
                       f"{'yes' if p['peak'] < gpu_gb * GiB else 'no'} |")
    return "\n".join(out)


def plan_for_config(cfg) -> str:
    """The plan for a train.py Config (train.py --dry_run_memory): its model (a checkpoint dir, or a preset name such
    as qwen3-vl-8b), options and world size (torchrun's WORLD_SIZE), on this machine's GPU (else 80 GiB)."""
    import os

    import torch
    if cfg.model == "toy":
        raise ValueError("--dry_run_memory plans a real model: give --model=DIR (a checkpoint) or a preset name "
                         "(qwen3-vl-2b, qwen3-vl-4b, qwen3-vl-8b)")
    lora = cfg.lora_rank > 0
    gpu_gb = torch.cuda.get_device_properties(0).total_memory / GiB if torch.cuda.is_available() else 80.0
    opt = Options(lora_rank=cfg.lora_rank, lora_targets=check_targets(cfg.lora_targets) if lora else ALL_TARGETS,
                  freeze_vision=cfg.freeze_vision, world_size=int(os.environ.get("WORLD_SIZE", "1")), fsdp=cfg.fsdp,
                  base_dtype="bf16" if lora and cfg.dtype != "fp32" and not cfg.fsdp else "fp32",
                  kl=cfg.kl_coef > 0, engines=1, gpu_gb=gpu_gb, group_size=cfg.group_size,
                  max_new_tokens=cfg.max_new_tokens, prompt_len=cfg.max_prompt_len,
                  micro_batch_size=cfg.micro_batch_size, micro_batch_tokens=cfg.micro_batch_tokens,
                  activation_checkpointing=cfg.activation_checkpointing,
                  free_rollout_memory=cfg.free_rollout_memory)
    return format_plan(cfg.model, load_model_config(cfg.model), opt)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen3-vl-8b", help="qwen3-vl-2b | qwen3-vl-4b | qwen3-vl-8b | checkpoint dir")
    ap.add_argument("--table", action="store_true", help="print the README table (presets, 1 and 8 GPUs)")
    for f, d in Options.__dataclass_fields__.items():
        kind = type(d.default)
        if kind is bool:
            ap.add_argument(f"--{f}", type=lambda s: s.lower() in ("1", "true", "yes"), nargs="?", const=True,
                            default=d.default)
        elif kind is tuple:
            ap.add_argument(f"--{f}", type=check_targets, default=d.default, help="e.g. q,k,v,o,gate,up,down")
        else:
            ap.add_argument(f"--{f}", type=kind, default=d.default)
    args = ap.parse_args(argv)
    if args.table:
        print(readme_table(gpu_gb=args.gpu_gb))
        return
    opt = Options(**{f: getattr(args, f) for f in Options.__dataclass_fields__})
    if opt.base_dtype not in BYTES:
        ap.error(f"--base_dtype={opt.base_dtype}: use fp32 or bf16")
    if opt.free_rollout_memory not in ("auto", "true", "false"):
        ap.error(f"--free_rollout_memory={opt.free_rollout_memory}: use auto, true or false")
    print(format_plan(args.model, load_model_config(args.model), opt))


if __name__ == "__main__":
    main()
