"""Preallocated key/value cache for incremental decoding, and the interface the model expects of any cache.

The cache interface (what `Qwen3VL.forward(..., cache=c)` calls, in this order, once per forward):

    c.next_position -> LongTensor (B,)
        The M-RoPE position the next real token of each row gets (0 for an empty cache; after an image
        prompt it is max prompt position + 1, which is how rope_deltas carry into decoding).
    c.append(new_mask: BoolTensor (B, T), next_position: LongTensor (B,)) -> None
        The forward is about to run T new tokens per row; new_mask marks which are real (False = padding,
        e.g. left padding of a prompt or a row that has already stopped). The cache reserves their slots,
        remembers which slots hold real tokens, builds the attention mask for this step, and stores the
        updated next_position.
    c.attend(layer_idx, q (B, H, T, D), k (B, Hkv, T, D), v (B, Hkv, T, D)) -> (B, H, T, D)
        Called by every decoder layer: store this step's rotated keys and values, then return the attention
        of q over every real token held so far (causal: a new token sees earlier slots and itself).

Any object with these members works without the model knowing: the training forward's shared-prefix caches
(prefix.py) and the rollout engine's key/value stores (rollout/kv_pages.py, whose step calls the decoder layers and so
needs `attend` alone). The model never reads k/v storage directly. This KVCache is the plain one: the engine's
prefill and the tests' reference decoding use it.
"""
import torch

from .decoder import KeyMask, attention


class KVCache:
    """Static cache: keys/values (layers, B, Hkv, max_len, D), written by slot index; no torch.cat growth.

    All rows advance in lockstep (slot `s` is step-aligned across the batch); `valid` (B, max_len) says
    which slots hold real tokens, so left padding and finished rows are simply masked out.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device="cpu", attn_impl: str = "sdpa"):
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0  # slots used so far (the same for every row)
        self.max_len = max_len
        self.attn_impl = attn_impl
        self._start = 0  # first slot of the current step
        self._mask = None  # KeyMask (B, 1, T, length) of the current step

    def append(self, new_mask: torch.Tensor, next_position: torch.Tensor) -> None:
        B, T = new_mask.shape
        start, end = self.length, self.length + T
        if end > self.max_len:
            raise ValueError(f"KVCache is full: {start} slots used + {T} new > max_len {self.max_len}")
        self.valid[:, start:end] = new_mask.bool()
        q_slot = torch.arange(start, end, device=self.valid.device)
        k_slot = torch.arange(end, device=self.valid.device)
        causal = k_slot[None, :] <= q_slot[:, None]  # (T, end)
        mask = causal[None] & self.valid[:, None, :end]  # (B, T, end)
        # A padding query has no real key to look at; letting it see itself keeps its softmax finite.
        mask = mask | (k_slot[None, :] == q_slot[:, None])[None]
        self._mask = KeyMask(mask[:, None])
        self._start, self.length = start, end
        self.next_position = next_position

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        start, end = self._start, self.length
        self.k[layer_idx, :, :, start:end] = k
        self.v[layer_idx, :, :, start:end] = v
        return attention(q, self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end], self._mask,
                         self.attn_impl)
