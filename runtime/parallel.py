"""Processes and model placement for train.py: torchrun process groups (gloo on CPU, NCCL on GPU), the policy
wrapped for data parallelism (DDP, or FSDP2 `fully_shard` per decoder block), the frozen reference, the FSDP2 units
the rollout engine gathers its weight copy from, and full state dicts for checkpoints (gathered on every rank,
written by rank 0).
"""
import os
from contextlib import nullcontext

import torch
import torch.distributed as dist

from config import Config
from model.prefix import GroupedForward


# ----------------------------------------------------------------------------- distributed

def init_distributed(cfg: Config):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain `python train.py` is a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device=cuda but torch sees no CUDA device")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if (world > 1 or (cfg.fsdp and "RANK" in os.environ)) and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, device


def all_reduce_sum(values, device):
    """Sums over ranks of a list of floats, or of a dict of named floats (same keys on every rank)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    named = isinstance(values, dict)
    keys = sorted(values) if named else None
    t = torch.tensor([values[k] for k in keys] if named else values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist())) if named else t.tolist()


def all_gather_objects(obj):
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown():
    """The end of a run: wait for every rank, then leave the process group (torchrun)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_sharded(model) -> bool:
    """Whether the model's parameters are FSDP2 shards (DTensors): the one test of it, for the trainer and the
    rollout engine alike."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def fsdp_units(model) -> list:
    """[(FSDP2 unit, [(parameter name in the model, name in the unit)])], root first (FSDP2 initialises from the
    root): each unit with the parameters it gathers itself (a nested unit's are its own). Tied parameters once."""
    from torch.distributed.fsdp import FSDPModule
    units = [(path, m) for path, m in model.named_modules() if isinstance(m, FSDPModule)]
    paths = [path for path, _ in units]
    out = []
    for path, unit in units:
        names = []
        for local, _ in unit.named_parameters():
            full = f"{path}.{local}" if path else local
            if max((u for u in paths if u == "" or full.startswith(u + ".")), key=len) == path:
                names.append((full, local))
        out.append((unit, names))
    return out


def uses_fsdp(cfg: Config) -> bool:
    """FSDP2 is applied only under torchrun (a process group); a plain `python train.py --fsdp=true` runs unsharded."""
    return cfg.fsdp and dist.is_available() and dist.is_initialized()


# ----------------------------------------------------------------------------- precision and memory

def autocast_ctx(cfg: Config, device):
    """The training forward's precision: bf16 autocast over fp32 master weights on a GPU (or on a CPU with
    --dtype=bf16); the rollout engine runs under the same, so that both round alike."""
    if device.type == "cuda" and cfg.dtype in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and cfg.dtype == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def rollout_kv_budget(cfg: Config, net, device) -> int | None:
    """--rollout_kv_gb in bytes; 0 = on CUDA a third of the memory that is free now less what the optimizer will
    take at its first step (fp32 gradients and AdamW's two moments), on CPU no limit."""
    if cfg.rollout_kv_gb > 0:
        return int(cfg.rollout_kv_gb * 2 ** 30)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    params = sum(p.numel() for p in net.parameters() if p.requires_grad)  # this rank's shard under FSDP2
    return max(int((free - 12 * params) / 3), 1 << 30)


# ----------------------------------------------------------------------------- models

def uses_lora(cfg: Config) -> bool:
    return cfg.lora_rank > 0 or bool(cfg.lora_init)


def build_policy(init_path: str, cfg: Config, device, world: int, resume_dir: str | None = None):
    """(the policy as the trainer calls it: DDP or FSDP2 around the model, the model itself).

    Full fine-tune: the initial (or resumed) weights as fp32 master weights; bf16 compute comes from autocast (DDP)
    or FSDP2's mixed-precision policy. LoRA (--lora_rank / --lora_init, model/lora.py): the initial model frozen (bf16
    on a GPU without FSDP2: it never gets gradients) with fp32 adapters, fresh or loaded (a resume's own adapters
    first). --freeze_vision: the vision tower and its mergers get no gradient and no optimizer state."""
    import model as vlm
    from model.lora import add_lora, freeze_vision, load_adapters
    lora = uses_lora(cfg)
    base_bf16 = lora and device.type == "cuda" and cfg.dtype != "fp32" and not uses_fsdp(cfg)
    net = vlm.load(resume_dir if resume_dir and not lora else init_path, device=device,
                   dtype=torch.bfloat16 if base_bf16 else torch.float32)
    if lora and (resume_dir or cfg.lora_init):
        load_adapters(net, resume_dir or cfg.lora_init)
    elif lora:
        add_lora(net, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, seed=cfg.seed)
    if cfg.freeze_vision:
        freeze_vision(net)
    if cfg.activation_checkpointing:
        from torch.distributed._composable import checkpoint
        for block in net.decoder_blocks():
            checkpoint(block)
    if uses_fsdp(cfg):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if device.type == "cuda" and cfg.dtype != "fp32" else MixedPrecisionPolicy()
        for block in net.decoder_blocks():
            fully_shard(block, mp_policy=mp)
        fully_shard(net, mp_policy=mp)
        return net, net
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # with shared_prefix both passes of a micro-batch are one DDP forward (GroupedForward)
        inner = GroupedForward(net) if cfg.shared_prefix else net
        ddp = DDP(inner, device_ids=[device.index] if device.type == "cuda" else None)
        return ddp, net
    return net, net


class Reference:
    """The frozen reference policy of the KL term: a second model (bf16 weights on a GPU: it never gets
    gradients), or with LoRA the policy itself with its adapters switched off, no second copy of the weights.
    Use its log-probs as `with ref.active(): logprobs.micro_logprobs(ref.model, ...)`."""

    def __init__(self, model, adapters_of=None):
        self.model, self.adapters_of = model, adapters_of

    def active(self):
        from model.lora import adapters_disabled
        return nullcontext() if self.adapters_of is None else adapters_disabled(self.adapters_of)


def build_reference(init_path: str, cfg: Config, device, net) -> Reference | None:
    """None without a KL term (kl_coef 0). A full fine-tune's reference is a second model in bf16 (fp32 on a CPU),
    under FSDP2 sharded like the policy (each decoder block, then the root; every unit, the root too, freed after its
    forward): each GPU holds 2 N / world of it, and its forward gathers one block at a time."""
    if cfg.kl_coef <= 0:
        return None
    if uses_lora(cfg):
        return Reference(net, adapters_of=net)
    import model as vlm
    dtype = torch.bfloat16 if device.type == "cuda" and cfg.dtype != "fp32" else torch.float32
    ref = vlm.load(init_path, device=device, dtype=dtype)
    ref.requires_grad_(False)
    if uses_fsdp(cfg):
        from torch.distributed.fsdp import fully_shard
        for block in ref.decoder_blocks():
            fully_shard(block)
        fully_shard(ref, reshard_after_forward=True)
    return Reference(ref.eval())


def full_states(wrapped, net, optimizer, cfg: Config, extras_from: str, optimizer_state: bool = True,
                final: bool = False):
    """(a function writing the policy to a directory, the optimizer state or None).

    The policy of a checkpoint is a complete Hugging Face model directory (weights with the tokenizer, chat template
    and processor settings of extras_from, the initial model), or with LoRA the adapters alone (small; resumed on
    the initial model). final: always a complete model directory, with LoRA the base and adapters merged. Under
    FSDP2 the weights (and the optimizer state, keyed by parameter name) are gathered to full CPU tensors: a
    collective that every rank must enter, although only rank 0 writes."""
    import model as vlm
    from model.lora import save_adapters, save_merged
    model_sd, optim_sd = None, None
    if uses_fsdp(cfg):
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_state_dict)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        if optimizer_state:
            model_sd, optim_sd = get_state_dict(wrapped, optimizer, options=options)
        else:
            model_sd = get_model_state_dict(wrapped, options=options)
    elif optimizer_state:
        optim_sd = optimizer.state_dict()
    if not uses_lora(cfg):
        return (lambda path: vlm.save(net, path, state_dict=model_sd, extras_from=extras_from)), optim_sd
    if final:
        return (lambda path: save_merged(net, path, state_dict=model_sd, extras_from=extras_from)), optim_sd
    return (lambda path: save_adapters(net, path, state_dict=model_sd, base_model=extras_from)), optim_sd


def load_optimizer_state(wrapped, optimizer, state: dict, cfg: Config) -> None:
    if uses_fsdp(cfg):  # rank 0 holds the full, name-keyed state; each rank keeps its shard
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(wrapped, optimizer, state,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:
        optimizer.load_state_dict(state)


def check_finite(net) -> None:
    """Every rank checks its own parameters (its shard under FSDP) and all agree, so that none enters the
    checkpoint's collective while another raises."""
    bad = [n for n, p in net.named_parameters()
           if not bool(torch.isfinite(p.detach().to_local() if hasattr(p, "to_local") else p.detach()).all())]
    if dist.is_initialized():
        flag = torch.tensor([float(len(bad))], device=next(net.parameters()).device)
        dist.all_reduce(flag)
        if float(flag) and not bad:
            bad = ["(on another rank)"]
    if bad:
        raise RuntimeError(f"refusing to save a poisoned checkpoint: non-finite values in {bad[:5]}")
