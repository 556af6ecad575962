"""Processes and model placement for train.py: torchrun process groups (gloo on CPU, NCCL on GPU), the policy
wrapped for data parallelism (DDP, or FSDP2 `fully_shard` per decoder block), the frozen reference, whole
parameters for rollouts, and full state dicts for checkpoints (gathered on every rank, written by rank 0).
"""
import os

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


def all_reduce_sum(values: list[float], device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_objects(obj):
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------- models

def decoder_blocks(module) -> list:
    """The text decoder's blocks (the unit FSDP shards and activation checkpointing wraps)."""
    return list(module.decoder_blocks())


def build_policy(path: str, cfg: Config, device, world: int):
    """fp32 master weights; bf16 compute comes from autocast (DDP) or FSDP2's mixed precision policy."""
    import model as vlm
    net = vlm.load(path, device=device, dtype=torch.float32)
    if cfg.activation_checkpointing:
        from torch.distributed._composable import checkpoint
        for block in decoder_blocks(net):
            checkpoint(block)
    if cfg.fsdp and dist.is_initialized():
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if device.type == "cuda" and cfg.dtype != "fp32" else MixedPrecisionPolicy()
        for block in decoder_blocks(net):
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


def build_reference(path: str, cfg: Config, device):
    """The frozen reference policy for the KL term (bf16 weights on GPU: it never gets gradients)."""
    import model as vlm
    dtype = torch.bfloat16 if device.type == "cuda" and cfg.dtype != "fp32" else torch.float32
    ref = vlm.load(path, device=device, dtype=dtype)
    ref.requires_grad_(False)
    return ref.eval()


class RolloutPolicy:
    """Rollouts need whole parameters: under FSDP2 unshard every block once for the whole generation
    (one all-gather per block per step instead of one per block per decoded token). Resharding after each
    forward is switched off meanwhile: FSDP2's post-forward hook would otherwise reshard a block after the
    prefill, and every decode step would all-gather it again (and the sampler's decode_step, which reads
    weights directly, needs them unsharded)."""

    def __init__(self, wrapped, net, fsdp: bool):
        self.wrapped, self.net, self.fsdp = wrapped, net, fsdp

    def _fsdp_modules(self):
        return [m for m in self.net.modules() if hasattr(m, "unshard") and hasattr(m, "reshard")]

    def __enter__(self):
        if self.fsdp:
            for m in self._fsdp_modules():
                m.set_reshard_after_forward(False, recurse=False)
                m.unshard()
        self.net.eval()
        return self.net

    def __exit__(self, *exc):
        if self.fsdp:
            for m in self._fsdp_modules():
                # back to what build_policy's fully_shard calls chose: blocks reshard after forward; the root
                # (net itself) does not, since its backward follows right away
                m.set_reshard_after_forward(m is not self.net, recurse=False)
                m.reshard()
        self.net.train()


def full_states(wrapped, net, optimizer, cfg: Config):
    """(a function writing the policy in HF layout, the optimizer state) for a checkpoint.

    Under FSDP2 both are gathered to full CPU tensors (optimizer state keyed by parameter name): a collective that
    every rank must enter, although only rank 0 writes."""
    import model as vlm
    if cfg.fsdp and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        model_sd, optim_sd = get_state_dict(wrapped, optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return (lambda path: vlm.save(net, path, state_dict=model_sd)), optim_sd
    return (lambda path: vlm.save(net, path)), optimizer.state_dict()


def load_optimizer_state(wrapped, optimizer, state: dict, cfg: Config) -> None:
    if cfg.fsdp and dist.is_initialized():  # rank 0 holds the full, name-keyed state; each rank keeps its shard
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
