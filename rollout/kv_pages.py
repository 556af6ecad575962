"""The rollout engine's key/value stores and the attention of one decode step over them. Shapes depend only on the
step's (rows, response length) bucket and the stores' capacities, never on the data, so a CUDA graph can replay the
step. Two stores with one interface; the engine takes PagedKV under a KV budget and ReservedKV without one:

PagedKV: a pool of fixed-size blocks (pages) and tables that say which blocks hold each prompt and each row.
    pool (layers, kv heads, blocks, block_size, 2, head_dim): keys [..., 0, :] and values [..., 1, :] side by side
    prefix_table (group slots, prompt blocks)   a prompt's blocks, stored once and shared by its G rows
    response_table (rows, response blocks)      each row's own response blocks, in position order
  Blocks are taken as responses grow and given back when rows stop (rollout/scheduler.py), so the rows a budget holds
  follow the tokens actually generated. Unused table entries point at block 0, which is never handed out. A step
  gathers the blocks it attends into contiguous keys/values, layer by layer: the price of paging in plain PyTorch
  (every attended key is copied once per step; bench/README.md has the numbers).
ReservedKV: every group slot holds its prompt (up to the prompt capacity) and every row its max_new_tokens, whether
  they are used or not: the attention reads them in place, no copy. A call's responses are ordered (group slot, kv
  head, member of the group), as the prompt's scores are, so the softmax's output is read by both value products as
  it is (one kernel fewer per compiled layer than rows first). With nothing to save (no budget) it is the
  faster store; under a budget it holds ~3-4x fewer rows (bench/kv_plan.py).

Both keep prefix_bias (group slots, prompt capacity): 0 on a prompt's real tokens, -inf past its end. The attention
(`attend`, the model's cache interface, model/kv_cache.py): the step's new key/value goes to its row's position; the
prompt of each group is scored once against the queries of its G rows stacked into one matrix (one batched matmul for
all groups); each row's response against its own queries; one softmax over [prompt | own response so far], the bias
masking padding and future positions. Scores in fp32 (as flash attention), probabilities in the store's dtype.
"""
import torch

from rollout.scheduler import blocks_for


def scores_fp32(q: torch.Tensor, k: torch.Tensor, out_dtype_ok: bool) -> torch.Tensor:
    """q (B, M, D) @ k (B, N, D)^T with fp32 output: low-precision inputs on CUDA through bmm's out_dtype (fp32
    accumulate, scores never rounded to 16 bits), elsewhere upcast first (CPU bf16 is only used in tests)."""
    if q.dtype == torch.float32:
        return torch.bmm(q, k.transpose(1, 2))
    if out_dtype_ok:
        return torch.bmm(q, k.transpose(1, 2), out_dtype=torch.float32)
    return torch.bmm(q.float(), k.float().transpose(1, 2))


def bmm_takes_out_dtype(like: torch.Tensor) -> bool:
    """Whether this torch's bmm takes out_dtype for these tensors (CUDA, torch >= 2.8): probed once, eagerly, when a
    store is built (never inside a captured step)."""
    if not like.is_cuda or like.dtype == torch.float32:
        return False
    a = torch.zeros(1, 1, 1, dtype=like.dtype, device=like.device)
    try:
        torch.bmm(a, a, out_dtype=torch.float32)
        return True
    except (TypeError, RuntimeError):
        return False


def step_bias(prefix_bias: torch.Tensor, rows: int, group_size: int, length: int, lengths: torch.Tensor):
    """(P, G, prompt capacity + length) additive scores bias: prompt padding | own tokens so far (this one too)."""
    P, G = rows // group_size, group_size
    positions = torch.arange(length, device=lengths.device)
    own = torch.zeros(rows, length, device=lengths.device).masked_fill_(positions >= lengths[:, None], float("-inf"))
    return torch.cat((prefix_bias[:P, None, :].expand(P, G, -1), own.view(P, G, length)), dim=-1)


# ----------------------------------------------------------------------------- paged

class PagedKV:
    reserved = False

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device):
        self.block_size, self.num_blocks = block_size, num_blocks
        self.pool = torch.zeros(num_layers, num_kv_heads, num_blocks, block_size, 2, head_dim, dtype=dtype,
                                device=device)
        self.prefix_table = self.response_table = self.prefix_bias = None
        self.fp32_out = bmm_takes_out_dtype(self.pool)

    @property
    def nbytes(self) -> int:
        return self.pool.numel() * self.pool.element_size()

    def resize(self, group_slots: int, rows: int, prompt_len: int, max_new_tokens: int) -> None:
        """(Re)allocate the tables (small; graphs captured over the old ones must be dropped by the caller)."""
        device, bs = self.pool.device, self.block_size
        self.prefix_table = torch.zeros(group_slots, blocks_for(prompt_len, bs), dtype=torch.long, device=device)
        self.response_table = torch.zeros(rows, blocks_for(max_new_tokens, bs), dtype=torch.long, device=device)
        # free slots keep 0 (every position "real"): their rows compute garbage nobody reads, but never NaN
        self.prefix_bias = torch.zeros(group_slots, self.prefix_table.shape[1] * bs, dtype=torch.float32,
                                       device=device)

    def blocks_for_call(self, group_size: int, max_new_tokens: int, slots: int) -> int:
        return self.num_blocks

    # ---- host-side writes between steps
    def write_prompt(self, slot: int, blocks: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """A prompt's keys/values k, v (layers, kv heads, T, head_dim) into its blocks; the slot's table and bias."""
        L, H, T, D = k.shape
        n, bs = len(blocks), self.block_size
        buf = torch.zeros(L, H, n * bs, 2, D, dtype=self.pool.dtype, device=self.pool.device)
        buf[:, :, :T, 0], buf[:, :, :T, 1] = k, v
        ids = torch.tensor(blocks, device=self.pool.device)
        self.pool[:, :, ids] = buf.view(L, H, n, bs, 2, D)
        self.prefix_table[slot].zero_()
        self.prefix_table[slot, :n] = ids
        self.prefix_bias[slot, :T] = 0.0
        self.prefix_bias[slot, T:] = float("-inf")

    def set_response_blocks(self, entries: list[tuple[int, int, int]]) -> None:
        """(row, position index, block) table entries, in one write."""
        if entries:
            e = torch.tensor(entries, device=self.pool.device)
            self.response_table[e[:, 0], e[:, 1]] = e[:, 2]

    def clear_rows(self, rows: list[int]) -> None:
        if rows:
            self.response_table[torch.tensor(rows, device=self.pool.device)] = 0

    def move_group(self, src: int, dst: int, rows_src: slice, rows_dst: slice, used: int) -> None:
        """A group's tables to another slot (its pages stay where they are)."""
        for table, a, b in ((self.prefix_table, src, dst), (self.prefix_bias, src, dst),
                            (self.response_table, rows_src, rows_dst)):
            table[b] = table[a]
            table[a] = 0

    # ---- the step
    def attention(self, rows: int, group_size: int, length: int, lengths: torch.Tensor) -> "PagedAttention":
        return PagedAttention(self, rows, group_size, length, lengths)

    def layers(self):
        return self.pool  # iterates per layer: (kv heads, blocks, block_size, 2, head_dim)


class PagedAttention:
    """One decode step's view of a PagedKV, built once per step and shared by the layers: for_layer(pages) gives the
    object a layer's attention calls (only tensors inside, so a compiled layer sees sizes, not ints to specialise)."""

    def __init__(self, kv: PagedKV, rows: int, group_size: int, length: int, lengths: torch.Tensor):
        bs = kv.block_size
        fed = (lengths - 1).clamp(min=0)  # response position of the token fed now: its keys/values go there
        self.write_block = kv.response_table[:rows].gather(1, (fed // bs)[:, None])[:, 0]  # (R,)
        self.write_offset = fed % bs
        self.prefix_index = kv.prefix_table[:rows // group_size]                           # (P, prompt blocks)
        self.response_index = kv.response_table[:rows, :length // bs].contiguous()         # (R, length / bs)
        self.bias = step_bias(kv.prefix_bias, rows, group_size, length, lengths)          # (P, G, Tp + length)
        self.fp32_out = kv.fp32_out
        self.pool = None

    def for_layer(self, pool: torch.Tensor) -> "PagedAttention":
        view = object.__new__(PagedAttention)
        view.__dict__.update(self.__dict__)
        view.pool = pool
        return view

    def attend(self, layer_idx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (R, H, 1, D), k/v (R, Hkv, 1, D) -> (R, H, 1, D)."""
        pool = self.pool  # this layer's (Hkv, blocks, bs, 2, D)
        R, H, _, D = q.shape
        P, G = self.bias.shape[:2]
        Hkv, bs = pool.shape[0], pool.shape[2]
        rep = H // Hkv  # GQA: query head h reads key/value head h // rep
        Tp, Ls = self.prefix_index.shape[1] * bs, self.response_index.shape[1] * bs
        pool[:, self.write_block, self.write_offset] = torch.stack((k[:, :, 0], v[:, :, 0]), 2).transpose(0, 1).to(
            pool.dtype)
        pre = pool.index_select(1, self.prefix_index.flatten()).view(Hkv * P, Tp, 2, D)   # gathered, per group
        own = pool.index_select(1, self.response_index.flatten()).view(Hkv * R, Ls, 2, D)  # gathered, per row
        qh = q.to(pool.dtype).view(P, G, Hkv, rep, D).permute(2, 0, 1, 3, 4).contiguous()  # (Hkv, P, G, rep, D)
        s_pre = scores_fp32(qh.view(Hkv * P, G * rep, D), pre[:, :, 0], self.fp32_out).view(Hkv, P, G, rep, Tp)
        s_own = scores_fp32(qh.view(Hkv * R, rep, D), own[:, :, 0], self.fp32_out).view(Hkv, P, G, rep, Ls)
        scores = torch.cat((s_pre, s_own), dim=-1)
        p = torch.softmax(torch.add(self.bias[None, :, :, None], scores, alpha=D ** -0.5), dim=-1).to(pool.dtype)
        o_pre = torch.bmm(p[..., :Tp].reshape(Hkv * P, G * rep, Tp), pre[:, :, 1]).view(Hkv, P, G, rep, D)
        o_own = torch.bmm(p[..., Tp:].reshape(Hkv * R, rep, Ls), own[:, :, 1]).view(Hkv, P, G, rep, D)
        return (o_pre + o_own).permute(1, 2, 0, 3, 4).reshape(R, H, 1, D)


# ----------------------------------------------------------------------------- reserved

class ReservedKV:
    reserved = True

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                 device):
        self.shape, self.dtype, self.device = (num_layers, num_kv_heads, head_dim), dtype, device
        self.block_size = block_size  # the scheduler counts in blocks; here they only size the reservation
        self.prefix_bias = None
        self.fp32_out = bmm_takes_out_dtype(torch.empty(0, dtype=dtype, device=device))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.pk, self.pv, self.sk, self.sv))

    @property
    def num_blocks(self) -> int:
        rows, N = self.sk.shape[1] // self.shape[1], self.sk.shape[2]
        return 1 + (rows * (N - self.block_size) + self.pk.shape[1] * self.pk.shape[3]) // self.block_size

    def resize(self, group_slots: int, rows: int, prompt_len: int, max_new_tokens: int) -> None:
        L, Hkv, D = self.shape
        Tp, N = (blocks_for(n, self.block_size) * self.block_size for n in (prompt_len, max_new_tokens))
        # a spare block of positions: a step's slice of the responses is then never the whole tensor, so a compiled
        # layer sees one memory layout at every length
        N += self.block_size
        self.pk = torch.zeros(L, group_slots, Hkv, Tp, D, dtype=self.dtype, device=self.device)  # a prompt per slot
        self.pv = torch.zeros_like(self.pk)
        # each row's response per key/value head, ordered (group slot, head, member of the group) for a call's
        # group size G: the order of the prompt's scores, so one softmax's output feeds both value products uncopied
        self.sk = torch.zeros(L, rows * Hkv, N, D, dtype=self.dtype, device=self.device)
        self.sv = torch.zeros_like(self.sk)
        self.prefix_bias = torch.zeros(group_slots, Tp, dtype=torch.float32, device=self.device)

    def blocks_for_call(self, group_size: int, max_new_tokens: int, slots: int) -> int:
        """The scheduler's block count that admits exactly `slots` groups of whole reservations."""
        per = blocks_for(self.pk.shape[3], self.block_size) + group_size * blocks_for(max_new_tokens, self.block_size)
        return 1 + slots * per

    def write_prompt(self, slot: int, blocks, k: torch.Tensor, v: torch.Tensor) -> None:
        T = k.shape[2]
        self.pk[:, slot, :, :T], self.pv[:, slot, :, :T] = k, v
        self.prefix_bias[slot, :T] = 0.0
        self.prefix_bias[slot, T:] = float("-inf")

    def set_response_blocks(self, entries) -> None:
        pass  # every row's positions are its own already

    def clear_rows(self, rows) -> None:
        pass

    def move_group(self, src: int, dst: int, rows_src: slice, rows_dst: slice, used: int) -> None:
        self.pk[:, dst], self.pv[:, dst] = self.pk[:, src], self.pv[:, src]
        self.prefix_bias[dst] = self.prefix_bias[src]
        self.prefix_bias[src] = 0.0
        n = (rows_src.stop - rows_src.start) * self.shape[1]  # the group's G rows x Hkv heads, side by side
        a, b = slice(src * n, (src + 1) * n), slice(dst * n, (dst + 1) * n)
        self.sk[:, b, :used], self.sv[:, b, :used] = self.sk[:, a, :used], self.sv[:, a, :used]

    def attention(self, rows: int, group_size: int, length: int, lengths: torch.Tensor) -> "ReservedAttention":
        return ReservedAttention(self, rows, group_size, length, lengths)

    def layers(self):
        return zip(self.pk, self.pv, self.sk, self.sv)


class ReservedAttention:
    def __init__(self, kv: ReservedKV, rows: int, group_size: int, length: int, lengths: torch.Tensor):
        Hkv, G = kv.shape[1], group_size
        # where (row r, kv head h), in that order, sits in the (P*Hkv*G, Ls, D) responses (row r is member r % G of
        # group slot r // G), and the position of the token fed now
        r, h = torch.arange(rows, device=lengths.device), torch.arange(Hkv, device=lengths.device)
        self.row_head_at = ((r // G * Hkv * G + r % G)[:, None] + h[None, :] * G).flatten()
        self.write_at = (lengths - 1).clamp(min=0).repeat_interleave(Hkv)
        self.bias = step_bias(kv.prefix_bias, rows, group_size, length, lengths)
        self.fp32_out, self.cut = kv.fp32_out, (rows // group_size, rows * Hkv, length)
        self.tensors = None

    def for_layer(self, tensors) -> "ReservedAttention":
        """One layer's (prompt keys, prompt values, response keys, response values), cut to the step's groups, rows
        and length here, outside a compiled layer (which then takes them as they are)."""
        (pk, pv, sk, sv), (P, RH, Ls) = tensors, self.cut
        view = object.__new__(ReservedAttention)
        view.__dict__.update(self.__dict__)
        view.tensors = (pk[:P].flatten(0, 1), pv[:P].flatten(0, 1), sk[:RH, :Ls], sv[:RH, :Ls])
        del view.cut
        return view

    def attend(self, layer_idx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (R, H, 1, D), k/v (R, Hkv, 1, D) -> (R, H, 1, D), the prompts and responses read in place."""
        pk, pv, sk, sv = self.tensors  # (P*Hkv, Tp, D) x 2, (P*Hkv*G, Ls, D) x 2
        R, H, _, D = q.shape
        P, G = self.bias.shape[:2]
        Tp, Ls = pk.shape[1], sk.shape[1]
        Hkv = k.shape[1]
        rep = H // Hkv
        sk[self.row_head_at, self.write_at] = k[:, :, 0].reshape(R * Hkv, D).to(sk.dtype)
        sv[self.row_head_at, self.write_at] = v[:, :, 0].reshape(R * Hkv, D).to(sv.dtype)
        # a group's queries side by side under each kv head: (P, Hkv, G, rep, D), the order of the stores' rows
        grid = q.to(sk.dtype).reshape(P, G, Hkv, rep, D).transpose(1, 2).reshape(P * Hkv, G * rep, D)
        s_pre = scores_fp32(grid, pk, self.fp32_out).view(P, Hkv, G, rep, Tp)
        s_own = scores_fp32(grid.view(P * Hkv * G, rep, D), sk, self.fp32_out).view(P, Hkv, G, rep, Ls)
        scores = torch.cat((s_pre, s_own), dim=-1)  # (P, Hkv, G, rep, Tp + Ls)
        p = torch.softmax(torch.add(self.bias[:, None, :, None], scores, alpha=D ** -0.5), dim=-1).to(sv.dtype)
        # both parts of p are views in the layout their products read (no copy of the probabilities)
        o_pre = torch.bmm(p[..., :Tp].reshape(P * Hkv, G * rep, Tp), pv).view(P, Hkv, G, rep, D)
        o_own = torch.bmm(p[..., Tp:].reshape(P * Hkv * G, rep, Ls), sv).view(P, Hkv, G, rep, D)
        return (o_pre + o_own).transpose(1, 2).reshape(R, H, 1, D)
