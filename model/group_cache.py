"""Shared-prefix KV cache for group sampling: each prompt's prefix keys/values are stored once and attended by
its G sample rows; every row keeps only its own response keys/values. Same interface as KVCache (see kv_cache.py).

    cache = model.new_cache(P, Tp); model(prompt_ids, attention_mask=m, cache=cache)   # prefill P prompts once
    cache = GroupCache(cache, group_size=G, max_new_tokens=N)                          # now P * G rows
"""
import torch

from .kv_cache import KVCache


class GroupCache:
    """Prefix block (layers, P, Hkv, Tp, D) shared by the G rows of each prompt + suffix block (layers, B, Hkv, S, D).

    Rows are prompt-major (row r = prompt r // G, sample r % G). Attention over [prefix | suffix] is one softmax
    over two score blocks, without copying the prefix per row:
      - prefix block: the queries of a prompt's G rows are stacked into one matrix, (P, Hkv, G*rep*T, D) against
        the prompt's (P, Hkv, Tp, D) keys: one matmul per prompt instead of G (and no G-fold prefix in memory);
      - suffix block: per row, (B, Hkv, rep*T, D) against the row's own (B, Hkv, S, D) keys, moved into the same
        (prompt, group) grid; the two score blocks are concatenated (scores only, Tp + S per query) and
        normalised by one softmax, then each block's probabilities multiply its own values.
    `keep(rows)` drops finished rows (and prompts whose rows have all finished) so they cost no further compute;
    groups may then have different sizes, and the prefix block's queries are scattered into a padded
    (P, Gmax) grid (the padding slots compute garbage that is never read).
    """

    def __init__(self, prefix: KVCache, group_size: int, max_new_tokens: int):
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        L, P, Hkv, _, D = prefix.k.shape
        Tp = prefix.length
        device, dtype = prefix.k.device, prefix.k.dtype
        self.group_size = group_size
        # The prefix block: the prefill cache's storage itself (no copy). pk/pv are views of the live prompts.
        self._pk, self._pv = prefix.k[:, :, :, :Tp], prefix.v[:, :, :, :Tp]
        self.pk, self.pv = self._pk, self._pv
        # Left padding of the prompts as an additive score bias (P, 1, 1, Tp); None when no prompt is padded.
        valid = prefix.valid[:, :Tp]
        self.prefix_bias = None if bool(valid.all()) else \
            torch.zeros(P, 1, 1, Tp, device=device).masked_fill(~valid[:, None, None, :], float("-inf"))
        B = P * group_size
        # The suffix block, allocated once; sk/sv are views of its first rows (the live ones, see keep).
        self._sk = torch.zeros(L, B, Hkv, max_new_tokens, D, dtype=dtype, device=device)
        self._sv = torch.zeros_like(self._sk)
        self.sk, self.sv = self._sk, self._sv
        self.valid = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=device)
        self.next_position = prefix.next_position.repeat_interleave(group_size)  # (B,)
        self.length = 0  # suffix slots used (the same for every row)
        self.max_new_tokens = max_new_tokens
        self.nbytes = sum(t.numel() * t.element_size() for t in (self.pk, self.pv, self.sk, self.sv))
        self._start = 0
        self._bias = None  # (B, 1, 1, T, length) additive suffix mask of the current step, None if nothing is masked
        # Row -> prompt bookkeeping for the prefix block (see _regroup).
        self.row_prompt = torch.arange(P, device=device).repeat_interleave(group_size)
        self._regroup()

    @property
    def batch_size(self) -> int:
        return self.row_prompt.numel()

    def _regroup(self) -> None:
        """Place each row in the (prompts, Gmax) grid of the prefix block: slot = prompt * Gmax + rank in group."""
        counts = torch.bincount(self.row_prompt, minlength=self.pk.shape[1])
        self.gmax = int(counts.max())
        # dense: every prompt has gmax rows, so the grid is the row order itself and no scatter is needed
        self.dense = bool((counts == self.gmax).all())
        first = torch.cumsum(counts, 0) - counts  # first row of each prompt
        rank = torch.arange(self.batch_size, device=counts.device) - first[self.row_prompt]
        self.slot = self.row_prompt * self.gmax + rank

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these rows (increasing indices into the current rows); prompts left without rows go too.

        Compaction is in place: kept rows move down to the front of the storage (their used slots only), so
        dropping rows never allocates a second cache; it costs about one read of the kept rows' keys/values."""
        rows = rows.to(self.sk.device)
        n = rows.numel()
        if n == 0 or bool((rows[1:] <= rows[:-1]).any()) or int(rows[-1]) >= self.batch_size:
            raise ValueError("GroupCache.keep needs a non-empty increasing list of current rows")
        if not torch.equal(rows, torch.arange(n, device=rows.device)):
            for store in (self._sk, self._sv):
                store[:, :n, :, :self.length] = store[:, rows, :, :self.length]  # the gather is a temporary copy
        self.sk, self.sv = self._sk[:, :n], self._sv[:, :n]
        self.valid, self.next_position = self.valid[rows], self.next_position[rows]
        row_prompt = self.row_prompt[rows]
        alive = torch.unique(row_prompt)  # sorted
        if alive.numel() < self.pk.shape[1]:
            P = alive.numel()
            if not torch.equal(alive, torch.arange(P, device=alive.device)):
                for store in (self._pk, self._pv):
                    store[:, :P] = store[:, alive]
            self.pk, self.pv = self._pk[:, :P], self._pv[:, :P]
            if self.prefix_bias is not None:
                self.prefix_bias = self.prefix_bias[alive]
            row_prompt = torch.searchsorted(alive, row_prompt)  # renumber prompts 0..P-1
        self.row_prompt = row_prompt
        self._regroup()

    # ---- the cache interface (kv_cache.py) ----
    def append(self, new_mask: torch.Tensor, next_position: torch.Tensor) -> None:
        B, T = new_mask.shape
        if B != self.batch_size:
            raise ValueError(f"GroupCache holds {self.batch_size} rows but the forward has {B}")
        start, end = self.length, self.length + T
        if end > self.max_new_tokens:
            raise ValueError(f"GroupCache is full: {start} response slots used + {T} new > {self.max_new_tokens}")
        self.valid[:, start:end] = new_mask.bool()
        self._bias = None  # the usual decode step (one real token per row, no holes) needs no suffix mask
        if T > 1 or not bool(self.valid[:, :end].all()):
            q_slot = torch.arange(start, end, device=self.valid.device)
            k_slot = torch.arange(end, device=self.valid.device)
            keep = (k_slot[None, :] <= q_slot[:, None])[None] & self.valid[:, None, :end]  # (B, T, end)
            # An all-masked suffix row is fine: every prompt has at least one real prefix token.
            self._bias = torch.zeros(B, 1, 1, T, end, device=keep.device).masked_fill_(
                ~keep[:, None, None], float("-inf"))  # (B, 1, 1, T, end) against scores (B, Hkv, rep, T, end)
        self._start, self.length = start, end
        self.next_position = next_position

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, H, T, D), k/v (B, Hkv, T, D) -> (B, H, T, D): softmax over [own prompt's prefix | own suffix]."""
        start, end = self._start, self.length
        self.sk[layer_idx, :, :, start:end] = k
        self.sv[layer_idx, :, :, start:end] = v
        pk, pv = self.pk[layer_idx], self.pv[layer_idx]  # (P, Hkv, Tp, D)
        sk, sv = self.sk[layer_idx, :, :, :end], self.sv[layer_idx, :, :, :end]  # (B, Hkv, end, D)
        B, H, T, D = q.shape
        P, Hkv, Tp, _ = pk.shape
        G, M = self.gmax, H // Hkv * T  # GQA: query head h reads kv head h // rep; a kv head has M = rep*T queries
        q = (q * D ** -0.5).reshape(B, Hkv, M, D)

        # Scores of both blocks (3-D bmm on flattened views), then one softmax over [prefix | suffix] per row.
        s_pre = torch.bmm(self._to_grid(q).flatten(0, 1), pk.flatten(0, 1).transpose(1, 2))  # (P*Hkv, G*M, Tp):
        s_pre = s_pre.view(P, Hkv, G * M, Tp)  # one matmul per prompt for all its rows
        if self.prefix_bias is not None:
            s_pre += self.prefix_bias
        s_suf = torch.bmm(q.flatten(0, 1), sk.flatten(0, 1).transpose(1, 2)).view(B, Hkv, M, end)  # own response
        if self._bias is not None:
            s_suf = (s_suf.view(B, Hkv, M // T, T, end) + self._bias).view(B, Hkv, M, end)
        if self.dense:  # the grid is (prompt, sample) in row order: a transposed view, copied once by cat
            s_pre = s_pre.view(P, Hkv, G, M, Tp).transpose(1, 2)  # (P, G, Hkv, M, Tp)
            s_suf = s_suf.view(P, G, Hkv, M, end)
        else:
            s_pre = self._from_grid(s_pre)
        p = torch.cat([s_pre, s_suf], dim=-1).softmax(-1, dtype=torch.float32).to(v.dtype).view(B, Hkv, M, Tp + end)

        out = torch.bmm(p[..., Tp:].flatten(0, 1), sv.flatten(0, 1))  # (B*Hkv, M, D)
        out_pre = torch.bmm(self._to_grid(p[..., :Tp]).flatten(0, 1), pv.flatten(0, 1))  # (P*Hkv, G*M, D)
        if self.dense:  # the prefix output added through a transposed view, no copy back to rows
            out.view(P, G, Hkv, M, D).add_(out_pre.view(P, Hkv, G, M, D).transpose(1, 2))
        else:
            out = out.view(B, Hkv, M, D) + self._from_grid(out_pre.view(P, Hkv, G * M, D))
        return out.view(B, H, T, D)

    def attend_one(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """attend for one new token per row, in the decode step's 2-D layout (model.decode_step): q (B, H, D),
        k/v (B, Hkv, D) -> (B, H * D)."""
        return self.attend(layer_idx, q[:, :, None], k[:, :, None], v[:, :, None]).flatten(1)

    # ---- row layout <-> (prompt, group) grid ----
    def _to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Hkv, M, X) per row -> (P, Hkv, Gmax*M, X): each prompt's rows side by side (empty slots = 0)."""
        B, Hkv, M, X = x.shape
        P, G = self.pk.shape[1], self.gmax
        if not self.dense:
            grid = x.new_zeros((P * G, Hkv, M, X))
            grid[self.slot] = x
            x = grid
        return x.view(P, G, Hkv, M, X).transpose(1, 2).reshape(P, Hkv, G * M, X)

    def _from_grid(self, x: torch.Tensor) -> torch.Tensor:
        """(P, Hkv, Gmax*M, X) -> (B, Hkv, M, X): the inverse of _to_grid."""
        P, Hkv, GM, X = x.shape
        G = self.gmax
        x = x.reshape(P, Hkv, G, GM // G, X).transpose(1, 2).reshape(P * G, Hkv, GM // G, X)
        return x if self.dense else x[self.slot]
