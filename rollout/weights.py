"""The weights a rollout reads. A CUDA graph replays kernels over fixed addresses, so every tensor the decode step reads
must stay where it was when the graph was captured, and must hold the policy's current values at each rollout:

  - a plain model whose parameters are already in the step's precision: the live parameters themselves (optimizer
    steps update them in place; a reload moves them, which `key()` notices);
  - fp32 master weights under the trainer's bf16 autocast: a twin module that shares every parameter with the live
    model except the decoder's and the LM head's linear weights, which it holds as bf16 copies (what autocast would
    cast them to at every product), refreshed in place before each rollout;
  - a model sharded by FSDP2: a twin holding a whole copy of every parameter in the precision the trainer's forward
    computes in (FSDP2's param_dtype), refreshed in place before each rollout one FSDP unit at a time (each unit
    gathered, copied, freed: the transient is one decoder block, or the root's embeddings, head and vision tower).
The twin is the model's own class built on the meta device, with the same LoRA adapters; the engine calls it like the
model, so prefill and decode run the model's one forward. LoRA's enabled / merged flags are mirrored at refresh and
are part of `key()`, so a graph captured with adapters on never runs for the reference (adapters off).
"""
import torch
from torch import nn

from runtime.parallel import fsdp_units, is_sharded


def _lora_modules(model: nn.Module):
    from model.lora import LoRALinear
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def _build_twin(model: nn.Module) -> nn.Module:
    """The model's class with the same config and adapters, parameters on the meta device (filled by the caller)."""
    from model.lora import LoRALinear
    with torch.device("meta"):
        twin = type(model)(model.config)  # FSDP2's class constructs the original class (FSDPModule.__new__)
        for name, m in _lora_modules(model):
            parent, _, leaf = name.rpartition(".")
            base = twin.get_submodule(name)
            setattr(twin.get_submodule(parent), leaf, LoRALinear(base, m.parts, list(m.lora_A), m.rank, m.alpha))
    return twin.eval().requires_grad_(False)


def _set_param(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    parent, _, leaf = name.rpartition(".")
    owner = module.get_submodule(parent) if parent else module
    owner._parameters[leaf] = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor,
                                                                                          requires_grad=False)


class RolloutWeights:
    """model: the live model (unwrapped from DDP; FSDP2's root module itself). amp: the dtype the trainer's forward
    computes in under autocast (None: no autocast). Call refresh() before each rollout; `module` is what to run."""

    def __init__(self, model: nn.Module, amp: torch.dtype | None):
        self.live, self.amp = model, amp
        self.sharded = is_sharded(model)
        self.copies = {}  # twin parameter name -> (live parameter or None under FSDP2, owned copy)
        if self.sharded:
            self.module = _build_twin(model)
            self.units = fsdp_units(model)  # [(FSDP unit, [(name in the model, name in the unit)])], root first
            self._allocated = False
            self.refresh()  # the twin's tensors are allocated at the first refresh
        elif amp is not None and amp != model.dtype and self._linear_names(model):
            self.module = _build_twin(model)
            low = set(self._linear_names(model))
            for name, p in model.named_parameters(remove_duplicate=False):
                if name in low and p.dtype != amp:
                    copy = torch.empty(p.shape, dtype=amp, device=p.device)
                    self.copies[name] = (p, copy)
                    _set_param(self.module, name, copy)
                else:
                    _set_param(self.module, name, p)  # shared with the live model: same tensor, same address
        else:
            self.module = model

    @staticmethod
    def _linear_names(model: nn.Module) -> list[str]:
        """The weights autocast would cast at every step: the decoder's and the LM head's linear layers (the vision
        tower runs once per prompt, its casts are not worth a copy)."""
        out = []
        for prefix in ("language_model", "lm_head"):
            root = model.get_submodule(prefix)
            for name, m in ([(prefix, root)] if isinstance(root, nn.Linear) else
                            [(f"{prefix}.{n}", m) for n, m in root.named_modules()]):
                if isinstance(m, nn.Linear):
                    out.append(f"{name}.weight")
        return out

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the live values into the held copies, in place (their addresses never change)."""
        if self.sharded:
            self._refresh_sharded()
        for live, copy in self.copies.values():
            copy.copy_(live)
        self._mirror_lora_flags()

    def _refresh_sharded(self) -> None:
        params = dict(self.module.named_parameters(remove_duplicate=False))
        for unit, names in self.units:
            unit.unshard()  # this unit's parameters are whole tensors (FSDP2's param_dtype) until reshard
            live = dict(unit.named_parameters())
            for name, local in names:
                full = live[local]
                if not self._allocated:
                    params[name] = nn.Parameter(torch.empty(full.shape, dtype=full.dtype, device=full.device),
                                                requires_grad=False)
                    _set_param(self.module, name, params[name])
                params[name].copy_(full)
            unit.reshard()
        if not self._allocated:
            self.module.tie_weights()
            self._allocated = True

    def _mirror_lora_flags(self) -> None:
        if self.module is self.live:
            return
        twins = dict(_lora_modules(self.module))
        for name, m in _lora_modules(self.live):
            twins[name].enabled, twins[name].merged = m.enabled, m.merged

    def key(self) -> tuple:
        """What a captured graph depends on: the address of every tensor the step reads, and the adapters' flags."""
        flags = tuple((m.enabled, m.merged) for _, m in _lora_modules(self.live))
        return tuple(p.data_ptr() for p in self.module.parameters()), flags

    @property
    def nbytes(self) -> int:
        """Bytes held beyond the live model (the copies)."""
        if self.sharded:
            return sum(p.numel() * p.element_size() for p in self.module.parameters() if not p.is_meta)
        return sum(c.numel() * c.element_size() for _, c in self.copies.values())
