"""LoRA adapters in plain PyTorch (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"):
y = W x + b + (alpha / r) * B (A x) on chosen projections, the base frozen, B = 0 at the start. The KL term's
reference is the same network with the adapters switched off (`adapters_disabled`), so no second copy of the
weights is needed. Tests: .venv/bin/python -m pytest -q tests/test_lora.py

    add_lora(net, rank=8, alpha=16)             # q, k, v, o, gate, up, down of every decoder layer
    freeze_vision(net)                          # (full fine-tune) no gradient, no optimizer state for the tower
    with adapters_disabled(net): ref = net(...)  # the reference policy
    save_adapters(net, "runs/x/adapters"); load_adapters(fresh_net, "runs/x/adapters")
    save_merged(net, "runs/x/merged")           # W + (alpha / r) B A in the Hugging Face layout

Targets name Hugging Face projections. Our decoder fuses q/k/v into one matrix (and gate/up into another), so an
adapted module may hold several adapters, one per projection (part) it adapts, each with its own A (r, in) and
B (rows, r), exactly as separate per-projection adapters on the unfused model would be. The forward stacks the A's
into one matrix and puts the B's on a block diagonal, zero rows for the parts that are not adapted: two matrix
products per module whatever the number of parts, and each part's rows see only their own adapter.
"""
import json
import math
import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .checkpoint import save

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FORMAT = "safegrpo-lora-1"
ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")

# target -> (module inside a decoder layer, the Hugging Face projection it adapts)
DECODER_TARGETS = {
    "q": ("self_attn.qkv_proj", "q_proj"), "k": ("self_attn.qkv_proj", "k_proj"),
    "v": ("self_attn.qkv_proj", "v_proj"), "o": ("self_attn.o_proj", "o_proj"),
    "gate": ("mlp.gate_up_proj", "gate_proj"), "up": ("mlp.gate_up_proj", "up_proj"),
    "down": ("mlp.down_proj", "down_proj"),
}
# The same inside a ViT block. Hugging Face keeps the ViT's q/k/v as one `attn.qkv` tensor (rows: q, k, v thirds),
# adapted here per third. Qwen2.5-VL's ViT MLP is a SwiGLU like the decoder's; Qwen3-VL's is GELU(fc1) -> fc2, read
# as up -> down, with no gate (a "gate" target adapts nothing there).
VISION_TARGETS = {
    "q": ("attn.qkv", "q"), "k": ("attn.qkv", "k"), "v": ("attn.qkv", "v"), "o": ("attn.proj", "proj"),
    "gate": ("mlp.gate_up_proj", "gate_proj"), "up": ("mlp.gate_up_proj", "up_proj"),
    "down": ("mlp.down_proj", "down_proj"),
}
GELU_VISION_MLP = {"gate": None, "up": ("mlp.linear_fc1", "linear_fc1"), "down": ("mlp.linear_fc2", "linear_fc2")}


class LoRALinear(nn.Linear):
    """A linear layer with low-rank adapters on some of its row blocks (parts).

    Holds the base layer's own `weight` and `bias` Parameters (no copy; checkpoint names unchanged) and, for every
    adapted part, lora_A[part] (r, in) and lora_B[part] (rows, r). It stays an nn.Linear, so code that treats linear
    layers alike (the rollout engine's low-precision weight copies) still finds the base weight. Flags: `enabled`
    (False: the base layer alone, the reference policy) and `merged` (the adapters are folded into `weight`)."""

    def __init__(self, base: nn.Linear, parts: tuple, adapted: list, rank: int, alpha: float,
                 dtype: torch.dtype = torch.float32):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_parameter("weight", base.weight)
        self.register_parameter("bias", base.bias)
        self.parts = tuple(parts)  # ((name, rows), ...): every output row, in row order
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        rows = dict(self.parts)
        device = base.weight.device
        adapted = [name for name, _ in self.parts if name in adapted]  # row order (a dict would be sorted)
        self.lora_A = nn.ParameterDict([(p, nn.Parameter(torch.zeros(rank, self.in_features, device=device,
                                                                     dtype=dtype))) for p in adapted])
        self.lora_B = nn.ParameterDict([(p, nn.Parameter(torch.zeros(rows[p], rank, device=device, dtype=dtype)))
                                        for p in adapted])
        self.enabled, self.merged = True, False

    def stacked_A(self) -> torch.Tensor:
        """(P * r, in): the adapted parts' A matrices in row order."""
        As = [self.lora_A[name] for name, _ in self.parts if name in self.lora_A]
        return As[0] if len(As) == 1 else torch.cat(As)

    def block_B(self) -> torch.Tensor:
        """(out, P * r): each adapted part's B in its rows and its own r columns, zeros elsewhere."""
        if len(self.parts) == 1:
            return self.lora_B[self.parts[0][0]]
        zeros = next(iter(self.lora_B.values())).new_zeros  # an empty column block, the adapters' dtype
        return torch.block_diag(*[self.lora_B[name] if name in self.lora_B else zeros(rows, 0)
                                  for name, rows in self.parts])

    def delta(self) -> torch.Tensor:
        """scale * B A (out, in), in the adapters' dtype: what merging adds to `weight`."""
        return self.scale * (self.block_B() @ self.stacked_A())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged or not self.enabled:
            return y
        return y + self.scale * F.linear(F.linear(x, self.stacked_A()), self.block_B())  # (..., out)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, adapted={list(self.lora_A)}"


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """(name, module) of every adapted layer, in module order (a DDP/FSDP wrapper's inner modules included)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def is_lora_key(name: str) -> bool:
    """True for state-dict keys of adapter tensors (`....lora_A.<part>`, `....lora_B.<part>`)."""
    return ".lora_A." in name or ".lora_B." in name


# ----------------------------------------------------------------------------- adding adapters

def _parts_of(module: nn.Linear, path: str) -> tuple:
    """The row blocks of a layer: a FusedLinear's HF parts, the ViT's q/k/v thirds, or the whole layer."""
    if hasattr(module, "parts"):
        return tuple(module.parts)
    if path == "attn.qkv":
        third = module.out_features // 3
        return (("q", third), ("k", third), ("v", third))
    return ((path.rpartition(".")[2], module.out_features),)


def _block_plan(block: nn.Module, targets, table: dict) -> dict[str, list[str]]:
    """{module path inside the block: [parts to adapt]} for these targets."""
    plan = {}
    for t in targets:
        spot = table[t]
        if spot is not None and not _has(block, spot[0]):
            spot = GELU_VISION_MLP.get(t, spot)  # Qwen3-VL's ViT MLP
        if spot is None:
            continue
        path, part = spot
        plan.setdefault(path, [])
        if part not in plan[path]:
            plan[path].append(part)
    return plan


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def check_targets(targets) -> tuple:
    """Targets as a tuple in canonical order; a clear error for unknown names."""
    targets = tuple(t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip())
    bad = [t for t in targets if t not in ALL_TARGETS]
    if bad or not targets:
        raise ValueError(f"LoRA targets {list(targets)}: each must be one of {list(ALL_TARGETS)} (at least one)")
    return tuple(t for t in ALL_TARGETS if t in targets)


@torch.no_grad()
def add_lora(model: nn.Module, rank: int, alpha: float, targets=ALL_TARGETS, vision: bool = False, seed: int = 0,
             dtype: torch.dtype = torch.float32) -> nn.Module:
    """Wrap the targeted projections of every decoder layer (and of every ViT block when vision=True) with adapters
    and freeze everything else: afterwards only adapter tensors have requires_grad.

    rank r >= 1, alpha: the adapters add (alpha / r) * B A x. targets: names from ALL_TARGETS (or "q,k,v"). B = 0, so
    the first forward equals the base model's exactly; A ~ U(-1/sqrt(in), 1/sqrt(in)) (PyTorch's and PEFT's default
    kaiming_uniform(a=sqrt(5))) drawn from a CPU generator seeded with `seed`, in module order: the same adapters on
    any device. Adapters are `dtype` (fp32: master weights, whatever the base's dtype). Apply before wrapping the
    model in DDP / FSDP2 (fully_shard then shards adapters with their block). Returns the model."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha!r}")
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters (add_lora was called twice?)")
    targets = check_targets(targets)
    blocks = [(b, DECODER_TARGETS) for b in model.language_model.layers]
    if vision:
        blocks += [(b, VISION_TARGETS) for b in model.visual.blocks]
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    for block, table in blocks:
        for path, adapted in _block_plan(block, targets, table).items():
            base = block.get_submodule(path)
            parts = _parts_of(base, path)
            layer = LoRALinear(base, parts, adapted, rank, alpha, dtype)
            if not layer.weight.is_meta:  # a meta model (memory planning) needs no numbers
                bound = 1.0 / math.sqrt(layer.in_features)
                for A in layer.lora_A.values():
                    A.copy_(torch.empty(A.shape).uniform_(-bound, bound, generator=gen))
            parent, _, child = path.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, child, layer)
    return model


def lora_config(model: nn.Module) -> dict:
    """{rank, alpha, targets, vision} of a model's adapters, read back from its modules ({} if it has none)."""
    found = lora_modules(model)
    if not found:
        return {}
    inverse = {spot: t for table in (DECODER_TARGETS, VISION_TARGETS, GELU_VISION_MLP)
               for t, spot in table.items() if spot is not None}  # (module path, part) -> target
    targets, vision = set(), False
    for name, m in found:
        vision |= name.startswith("visual.") or ".visual." in name
        path = ".".join(name.split(".")[-2:])  # e.g. self_attn.qkv_proj, attn.qkv, mlp.linear_fc1
        targets.update(inverse[(path, part)] for part in m.lora_A)
    m = found[0][1]
    return {"rank": m.rank, "alpha": m.alpha, "targets": [t for t in ALL_TARGETS if t in targets], "vision": vision}


def freeze_vision(model: nn.Module) -> int:
    """No gradient (so no optimizer state) for the vision tower and its mergers (`model.visual`), with or without
    LoRA on the decoder. Image encoding then records no autograd graph either. Returns the parameters frozen."""
    if lora_modules(model.visual):
        raise ValueError("freeze_vision with LoRA adapters on the vision tower: the adapters would be frozen too; "
                         "use one or the other")
    model.visual.requires_grad_(False)
    return sum(p.numel() for p in model.visual.parameters())


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) with requires_grad, in module order: what the optimizer should hold."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- switching adapters off / merging

@contextmanager
def adapters_disabled(model: nn.Module):
    """Inside, every adapted layer computes its base layer alone: the model is the frozen base, the KL term's
    reference policy. Works through DDP / FSDP2 wrappers (it flips a flag on the inner modules). Under activation
    checkpointing leave the block before backward: the recomputation reads the flag as it is then."""
    found = [m for _, m in lora_modules(model)]
    if any(m.merged for m in found):
        raise ValueError("adapters_disabled on a merged model: the base weights are not there; unmerge_lora first")
    before = [m.enabled for m in found]
    for m in found:
        m.enabled = False
    try:
        yield model
    finally:
        for m, was in zip(found, before):
            m.enabled = was


def _check_local(m: LoRALinear, what: str) -> None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return
    if isinstance(m.weight, DTensor):
        raise ValueError(f"{what} needs whole parameters, these are sharded (FSDP2): unshard them first, or use "
                         "merged_state_dict on a full state dict")


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight in place, W <- W + (alpha / r) B A (computed in the adapters' dtype,
    rounded once to W's), and skip the adapters in the forward. The model then runs as fast as the base. In fp32,
    unmerge_lora gives W back up to one rounding per element (|error| <= ulp(W + dW) / 2 per cycle); in bf16 that
    rounding is ~0.4% of W, so do not merge into bf16 weights you mean to unmerge."""
    for _, m in lora_modules(model):
        _check_local(m, "merge_lora")
        if not m.merged:
            m.weight.add_(m.delta().to(m.weight.dtype))
            m.merged = True


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> None:
    """Undo merge_lora: W <- W - (alpha / r) B A, adapters active again in the forward."""
    for _, m in lora_modules(model):
        _check_local(m, "unmerge_lora")
        if m.merged:
            m.weight.sub_(m.delta().to(m.weight.dtype))
            m.merged = False


@contextmanager
def merged(model: nn.Module):
    """merge_lora inside, unmerge_lora on the way out (e.g. around a rollout; see merge_lora on rounding)."""
    merge_lora(model)
    try:
        yield model
    finally:
        unmerge_lora(model)


# ----------------------------------------------------------------------------- state dicts and files

def lora_state_dict(model: nn.Module, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """The adapter tensors alone, {our name: tensor}: from the model, or filtered from a full state dict (under
    FSDP2 the caller gathers one, e.g. get_state_dict(full_state_dict=True))."""
    sd = model.state_dict() if state_dict is None else state_dict
    return {k: v.detach() for k, v in sd.items() if is_lora_key(k)}


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state_dict: dict) -> None:
    """Copy adapter tensors into the model's adapters in place (same storage: optimizer state and the engine's
    CUDA graphs stay valid). Every adapter must be given, with its shape; nothing else may be."""
    own = {n: p for n, p in model.named_parameters() if is_lora_key(n)}
    missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise ValueError(f"adapter state does not match the model's adapters; missing: {missing[:5] or 'none'} "
                         f"({len(missing)}), unexpected: {unexpected[:5] or 'none'} ({len(unexpected)})")
    if any(m.merged for _, m in lora_modules(model)):
        raise ValueError("loading adapters into a merged model: unmerge_lora first")
    for name, p in own.items():
        t = state_dict[name]
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"adapter {name}: shape {list(t.shape)} in the file, {list(p.shape)} in the model "
                             f"(a different rank or model?)")
        p.copy_(t)


def save_adapters(model: nn.Module, path, state_dict: dict | None = None, base_model: str = "") -> None:
    """Write an adapter directory: adapter_config.json ({format, rank, alpha, targets, vision, base_model}) and
    adapter_model.safetensors (the adapter tensors, fp32, a few MB). state_dict: a full state dict when the
    model's own tensors are sharded. Each file is written to a temporary name and renamed into place."""
    cfg = lora_config(model)
    if not cfg:
        raise ValueError("save_adapters: the model has no LoRA adapters")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to("cpu").contiguous() for k, v in lora_state_dict(model, state_dict).items()}
    tmp = path / (ADAPTER_WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path / ADAPTER_WEIGHTS)
    tmp = path / (ADAPTER_CONFIG + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, **cfg, "base_model": str(base_model)}, f, indent=2)
    os.replace(tmp, path / ADAPTER_CONFIG)


def read_adapter_config(path) -> dict:
    """The adapter_config.json of an adapter directory, checked."""
    file = Path(path) / ADAPTER_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no adapter config (is {path} an adapter directory from save_adapters?)")
    with open(file) as f:
        cfg = json.load(f)
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{file}: format {cfg.get('format')!r}, expected {FORMAT!r}")
    return cfg


def load_adapters(model: nn.Module, path) -> nn.Module:
    """Load an adapter directory into a model: adds the adapters first if it has none (rank, alpha, targets and
    vision from the directory's config), else checks that its adapters are the same shape of thing."""
    cfg = read_adapter_config(path)
    want = {k: cfg[k] for k in ("rank", "alpha", "targets", "vision")}
    have = lora_config(model)
    if not have:
        add_lora(model, want["rank"], want["alpha"], want["targets"], want["vision"])
    elif have != want:
        raise ValueError(f"{path}: adapters {want} do not match the model's adapters {have}")
    load_lora_state_dict(model, load_file(str(Path(path) / ADAPTER_WEIGHTS)))
    return model


@torch.no_grad()
def merged_state_dict(model: nn.Module, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """The base model's state dict (our names, no adapter keys) with every adapter folded in: W + (alpha / r) B A,
    summed in fp32 and rounded once to W's dtype. From the model's own tensors, or from a full state dict of it
    (e.g. gathered from FSDP2 onto the CPU); weights already merged in place are taken as they are. Pass the
    model itself, not a DDP wrapper (whose names start with `module.`)."""
    sd = model.state_dict() if state_dict is None else state_dict
    out = {k: v for k, v in sd.items() if not is_lora_key(k)}
    for name, m in lora_modules(model):
        if m.merged:
            continue
        A = torch.cat([sd[f"{name}.lora_A.{p}"] for p, _ in m.parts if p in m.lora_A]).float()  # (P * r, in)
        B = torch.block_diag(*[sd[f"{name}.lora_B.{p}"].float() if p in m.lora_B else A.new_zeros(rows, 0)
                               for p, rows in m.parts])  # (out, P * r)
        W = sd[f"{name}.weight"]
        out[f"{name}.weight"] = (W.float() + m.scale * (B @ A).to(W.device)).to(W.dtype)
    return out


def save_merged(model: nn.Module, path, state_dict: dict | None = None, dtype: torch.dtype | None = None,
                **save_options) -> None:
    """The merged policy as a plain model in the Hugging Face layout (model.save): config.json + safetensors that
    transformers and model.load read, no adapter keys. dtype: of the written floating tensors (default: the
    model's); save_options go to model.save (max_shard_size, ...). The file layout comes from a skeleton of the
    same class on the meta device (no memory)."""
    sd = merged_state_dict(model, state_dict)
    dtype = dtype or model.lm_head.weight.dtype
    with torch.device("meta"):
        skeleton = type(model)(model.config).to(dtype)
    save(skeleton, path, **save_options,
         state_dict={k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()})
