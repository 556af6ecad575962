"""Static key/value slots for the rollout engine (engine.py): fixed shapes, written by index, attended through fixed
masks, so that one decode step has the same shapes every time and a CUDA graph can replay it.

S group slots; a slot holds one prompt's prefix keys/values once (Tp positions) and the response keys/values of its
G rows (N positions each). Row r belongs to slot r // G. Implements the `attend` of the model's cache interface
(kv_cache.py) for one new token per row; the engine sets the per-step inputs (`write_at`, `bias`, `rows`,
`length`) before each forward, so that every layer shares them.
"""
import torch


class SlotCache:
    def __init__(self, num_layers: int, slots: int, group_size: int, num_kv_heads: int, prefix_len: int,
                 max_new_tokens: int, head_dim: int, dtype: torch.dtype, device):
        L, S, G, Hkv, Tp, N, D = num_layers, slots, group_size, num_kv_heads, prefix_len, max_new_tokens, head_dim
        self.group_size, self.prefix_len = G, Tp
        self.pk = torch.zeros(L, S, Hkv, Tp, D, dtype=dtype, device=device)  # each prompt once per group
        self.pv = torch.zeros_like(self.pk)
        self.sk = torch.zeros(L, S * G, Hkv, N, D, dtype=dtype, device=device)  # each row's own response
        self.sv = torch.zeros_like(self.sk)
        # Prompt padding of each row's prefix as an additive score bias (S*G, Tp): 0 = a prompt token, -inf = padding.
        # Free slots keep 0 (all "real"): their rows compute garbage that nobody reads, but never NaN.
        self.prefix_bias = torch.zeros(S * G, Tp, dtype=torch.float32, device=device)
        self._row_index = torch.arange(S * G, device=device)[:, None]
        self._head_index = torch.arange(Hkv, device=device)[None, :]
        # Per-step inputs, set by the engine's step before the forward (tensors of the step, or views of its state).
        self.rows = S * G    # rows in this step (a multiple of G): the first `rows` rows, slots rows // G
        self.length = N      # response positions the step attends (>= every row's length)
        self.write_at = None  # (rows,) long: the response position of each row's new token
        self.bias = None      # (rows, Tp + length) float32 additive scores bias: prefix padding | response mask

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.pk, self.pv, self.sk, self.sv))

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (R, H, 1, D), k/v (R, Hkv, 1, D) -> (R, H, 1, D): store k/v at write_at, then one softmax over
        [the row's prompt prefix | its own response so far], without copying the prefix for each row:
          - prefix scores: the queries of a slot's G rows stacked into one matrix, (P, Hkv, G*rep, D) against the
            slot's (P, Hkv, Tp, D) keys: one batched matmul for all groups (P = R / G);
          - response scores: each row's (R, Hkv, rep, D) against its own (R, Hkv, length, D) keys.
        Scores are fp32 (as in flash attention), probabilities go back to the cache dtype for the value products."""
        R, H, _, D = q.shape
        G, Tp, Ls = self.group_size, self.prefix_len, self.length
        P, Hkv = R // G, self.pk.shape[2]
        rep = H // Hkv  # GQA: query head h reads key/value head h // rep
        sk, sv = self.sk[layer_idx, :R], self.sv[layer_idx, :R]  # (R, Hkv, N, D)
        at = (self._row_index[:R], self._head_index, self.write_at[:, None])  # (R, Hkv) positions
        sk.index_put_(at, k[:, :, 0].to(sk.dtype))
        sv.index_put_(at, v[:, :, 0].to(sv.dtype))
        pk, pv = self.pk[layer_idx, :P].flatten(0, 1), self.pv[layer_idx, :P].flatten(0, 1)  # (P*Hkv, Tp, D)
        sk, sv = sk[:, :, :Ls].flatten(0, 1), sv[:, :, :Ls].flatten(0, 1)  # (R*Hkv, Ls, D)

        q = q.to(sk.dtype).reshape(P, G, Hkv, rep, D)
        grid = q.transpose(1, 2).reshape(P * Hkv, G * rep, D)  # a group's queries side by side, per kv head
        s_pre = fp32_bmm(grid, pk.transpose(1, 2)).view(P, Hkv, G, rep, Tp).transpose(1, 2)  # (P, G, Hkv, rep, Tp)
        s_own = fp32_bmm(q.reshape(R * Hkv, rep, D), sk.transpose(1, 2)).view(P, G, Hkv, rep, Ls)
        scores = torch.cat((s_pre, s_own), dim=-1)  # (P, G, Hkv, rep, Tp + Ls)
        p = torch.softmax(torch.add(self.bias.view(P, G, 1, 1, Tp + Ls), scores, alpha=D ** -0.5), dim=-1)
        p = p.to(sv.dtype)

        p_pre = p[..., :Tp].transpose(1, 2).reshape(P * Hkv, G * rep, Tp)
        o_pre = torch.bmm(p_pre, pv).view(P, Hkv, G, rep, D).transpose(1, 2)  # (P, G, Hkv, rep, D)
        o_own = torch.bmm(p[..., Tp:].reshape(R * Hkv, rep, Ls), sv).view(P, G, Hkv, rep, D)
        return (o_own + o_pre).view(R, H, 1, D)


_bmm_out_dtype = None  # whether this torch's CUDA bmm takes out_dtype (torch >= 2.8); probed on first use


def fp32_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (batched) with fp32 output. Low-precision inputs on CUDA go through bmm's out_dtype (fp32 accumulate,
    the scores never rounded to 16 bits, as in flash attention); elsewhere they are upcast first (CPU bf16 is only
    used in tests)."""
    global _bmm_out_dtype
    if a.dtype == torch.float32:
        return torch.bmm(a, b)
    if a.is_cuda:
        if _bmm_out_dtype is None:  # the engine's first step runs eagerly, before any graph capture
            try:
                torch.bmm(a[:1], b[:1], out_dtype=torch.float32)
                _bmm_out_dtype = True
            except (TypeError, RuntimeError):
                _bmm_out_dtype = False
        if _bmm_out_dtype:
            return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())
