"""The Qwen text decoder: RMSNorm, GQA attention with optional q/k RMSNorm and biases, SwiGLU MLP, blocks,
and the stack. One decoder for Qwen3-VL (q/k norm, no biases) and Qwen2.5-VL (q/k/v biases, no q/k norm):
the qk_norm / qkv_bias / o_bias flags of TextConfig. Module names match the Hugging Face keys under
`language_model.`, except the two fused projections (FusedLinear): q/k/v are one matrix `qkv_proj` and the
MLP's gate/up one matrix `gate_up_proj`, one matrix product each instead of three and two; checkpoints keep
Hugging Face's separate tensors (model/checkpoint.py splits and joins them).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import TextConfig
from .rope import apply_rotary


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight, computed in fp32. When x and the weight share a dtype this is one fused
    kernel (F.rms_norm) that rounds once to x's dtype: in fp32 exactly HF's result, in bf16 within one rounding of it
    (HF rounds the normalised x, then the product). Otherwise (bf16 activations and an fp32 weight, as under autocast
    with fp32 master weights, or one weight row per head) HF's order, which also gives HF's fp32 result dtype."""
    if weight.dtype == x.dtype and weight.shape == x.shape[-1:]:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x, (x.shape[-1],), eps=eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class FusedLinear(nn.Linear):
    """Several Hugging Face projections of the same input as one matrix: `parts` = ((HF name, out rows), ...) in
    row order. The checkpoint reader joins the parts' tensors (`<parent>.<HF name>.weight`) into this one and
    the writer splits it again, so a saved model has exactly the Hugging Face keys."""

    def __init__(self, in_features: int, parts: tuple, bias: bool):
        super().__init__(in_features, sum(rows for _, rows in parts), bias=bias)
        self.parts = tuple(parts)


class KeyMask:
    """Which keys each query attends: keep (B, 1, Tq, Tk) bool, True = attend. Every layer of a forward shares
    one, and it converts itself to SDPA's additive form once (again only if the dtype changes): given the bool
    mask, SDPA converts it in every layer, and autograd then keeps each layer's float copy for the backward
    (L copies of a B x T x T mask; one shared copy is kept once; tests/test_prefix.py). The additive form is a view
    of storage whose last dimension is rounded up to a multiple of 8: SDPA's masked kernels need that alignment and
    would otherwise pad (copy) the mask in every layer. The training forward's shared-prefix path needs no mask at all
    (model/prefix.py); this one serves the per-row forward, the prefill and the tests' oracles."""

    def __init__(self, keep: torch.Tensor):
        self.keep = keep
        self._additive = None

    def additive(self, q: torch.Tensor) -> torch.Tensor:
        """The mask in the dtype SDPA computes in for this q: under autocast that is autocast's dtype (SDPA would
        cast a mask of q's dtype again in every layer), else q's."""
        device = q.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else q.dtype
        if self._additive is None or self._additive.dtype != dtype:
            *lead, Tk = self.keep.shape
            padded = torch.zeros(*lead, -(-Tk // 8) * 8, dtype=dtype, device=self.keep.device)
            self._additive = padded[..., :Tk].masked_fill_(~self.keep, float("-inf"))
        return self._additive


def causal_mask(attention_mask: torch.Tensor | None) -> KeyMask | None:
    """Key mask for a full (cache-free) forward: (B, T) 1 = real token -> KeyMask (B, 1, T, T).

    None when there is no padding: attention is then plainly causal (SDPA's is_causal fast path).
    A padding query has no real key before it, so it also attends to itself: its output is garbage that
    nobody reads, but it stays finite (an all-masked softmax row would be NaN, and NaN leaks into grads).
    """
    if attention_mask is None or bool(attention_mask.all()):
        return None
    T = attention_mask.shape[1]
    idx = torch.arange(T, device=attention_mask.device)
    causal = idx[None, :] <= idx[:, None]  # (Tq, Tk)
    mask = causal[None] & attention_mask.bool()[:, None, :]  # (B, Tq, Tk)
    mask = mask | torch.eye(T, dtype=torch.bool, device=mask.device)[None]
    return KeyMask(mask[:, None])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: KeyMask | None,
              impl: str = "sdpa") -> torch.Tensor:
    """Scaled dot-product attention with grouped key/value heads.

    q (B, H, Tq, D); k, v (B, Hkv, Tk, D); mask a KeyMask (B, 1, Tq, Tk), or None = causal with Tq == Tk.
    Returns (B, H, Tq, D). "eager" is the explicit matmul/softmax(fp32) version, kept as the oracle.
    """
    rep = q.shape[1] // k.shape[1]
    if impl == "sdpa":
        if mask is None:  # no mask: GQA without copying k/v, flash kernel on GPU
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=rep > 1)
        # With a mask, expand k/v so the masked kernels (memory-efficient on GPU) accept them.
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.additive(q))
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, Tq, Tk)
    if mask is None:
        Tq, Tk = scores.shape[-2:]
        keep = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
    else:
        keep = mask.keep
    scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.impl = cfg.attn_impl
        C, H, Hkv, D = cfg.hidden_size, self.n_heads, self.n_kv_heads, cfg.head_dim
        self.qkv_proj = FusedLinear(C, (("q_proj", H * D), ("k_proj", Hkv * D), ("v_proj", Hkv * D)), cfg.qkv_bias)
        self.o_proj = nn.Linear(H * D, C, bias=cfg.o_bias)
        # Qwen3 normalizes each head's q and k (over head_dim) before the rotary.
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None):
        """x (B, T, C); cos/sin (B, T, D) from rope.mrope_cos_sin; mask a KeyMask or None (causal); cache: a
        KVCache-like object (kv_cache.py) whose attend() stores this step's keys/values and attends over all."""
        B, T, _ = x.shape
        H, Hkv = self.n_heads, self.n_kv_heads
        qkv = self.qkv_proj(x).view(B, T, H + 2 * Hkv, self.head_dim)
        qk, v = qkv.split((H + Hkv, Hkv), dim=2)  # q and k heads side by side: one norm, one rotary for both
        if self.qk_norm:
            weight = torch.cat((self.q_norm.weight.expand(H, -1), self.k_norm.weight.expand(Hkv, -1)))  # (H+Hkv, D)
            qk = rms_norm(qk, weight, self.q_norm.eps)
        qk = apply_rotary(qk, cos[:, :, None], sin[:, :, None])  # (B, T, 1, D): the same angles for every head
        q, k = qk.split((H, Hkv), dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        if cache is None:
            y = attention(q, k, v, mask, self.impl)
        else:  # the cache stores k/v at this step's slots and attends over everything it holds
            y = cache.attend(self.layer_idx, q, k, v)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x)), gate and up as one matrix. The decoder's has no biases; Qwen2.5-VL's
    ViT blocks use it with biases."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, act=F.silu):
        super().__init__()
        self.gate_up_proj = FusedLinear(hidden_size, (("gate_proj", intermediate_size), ("up_proj", intermediate_size)),
                                        bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act = act

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    """Token embedding + decoder layers + final norm (HF: `model.language_model`)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, deepstack=None):
        """x (B, T, C) input embeddings; cos/sin (B, T, D); mask from `causal_mask` (ignored with a cache).

        deepstack: None or (visual_mask (B, T) bool, [features (n_visual, C)] * K): DeepStack adds the
        k-th visual feature map to the hidden states at the visual positions after decoder layer k.
        """
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache)
            if deepstack is not None and i < len(deepstack[1]):
                visual_mask, features = deepstack
                x = x.index_put((visual_mask,), x[visual_mask] + features[i].to(x.dtype))
        return self.norm(x)
