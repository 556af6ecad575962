"""The device side of a rollout: the prefill, and DecodeState, the static-shape decode step that a CUDA graph replays on a
GPU and that runs eagerly on a CPU. rollout/engine.py schedules prompts through it (admit, step, check); this file is
what runs on the device.
"""
import time

import torch

from model.processor import left_pad
from model.rope import inv_freq, text_cos_sin
from rollout.kv_slots import SlotCache
from rollout.randomness import _as_int64, splitmix64, uniforms_t
from rollout.sampling import sample


# ----------------------------------------------------------------------------- prefill

def prefill(model, prompts: list[dict], pad_token_id: int, extra_slots: int = 0):
    """One forward over the left-padded prompts (images encoded here, once): (last logits (P, V), KVCache)."""
    ids, mask, pixels, grid = left_pad(prompts, pad_token_id, model.device)
    cache = model.new_cache(len(prompts), ids.shape[1] + extra_slots)
    logits = model(ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid, cache=cache,
                   logits_to_keep=1)
    return logits[:, -1], cache


# ----------------------------------------------------------------------------- the decode state

class Decoder(torch.nn.Module):
    """The part of a Qwen-VL model a decode step runs: the text decoder and the LM head (shared modules, not copies),
    so the step can run it with substituted low-precision matrices (torch.func.functional_call)."""

    def __init__(self, net):
        super().__init__()
        self.language_model, self.lm_head = net.language_model, net.lm_head

    def forward(self, x, cos, sin, cache):
        h = self.language_model(x, cos, sin, None, cache)[:, 0]  # (R, C)
        if h.device.type == "cpu" and self.lm_head.bias is None:
            # (W h^T)^T, a transposed view: MKL runs this wide, thin product (V x C by C x R) about twice as fast as
            # h W^T (1.8 vs 0.8 ms for bench/sampler.py's 8 rows x 8192-token vocabulary, 2026-12-04). On a GPU the
            # logits must stay row-major for the sampling kernels.
            return torch.mm(self.lm_head.weight, h.t()).t()
        return self.lm_head(h)  # (R, V)


class DecodeState:
    """Everything one shape of generation needs on the device: the SlotCache, the per-row state, the weights the step
    reads, and the step's CUDA graphs. Built by engine.Engine for a (G, N, prompt length, slots, sampling, precision) key and
    reused while the key holds; rows of slot s are s*G .. s*G + G - 1."""

    def __init__(self, model, key: tuple, slots: int, group_size: int, prefix_len: int,
                 max_new_tokens: int, sampling: tuple, amp):
        t = model.config.text
        device = model.device
        self.key, self.model, self.amp = key, model, amp
        self.G, self.N, self.S = group_size, max_new_tokens, slots
        self.temperature, self.top_k, self.top_p = sampling
        # Precision. The step runs under the same autocast as the trainer's forward, so it rounds like it. When
        # autocast would cast fp32 master weights to bf16 at every matrix product, the step reads bf16 copies of the
        # linear layers instead (refreshed from the live weights at each generate); norms and the embedding stay as
        # they are, as under autocast.
        self.decoder = Decoder(model)
        self.copies = {}  # name in Decoder -> (live parameter, low-precision copy)
        if amp is not None and amp != model.dtype:
            for name, module in self.decoder.named_modules():
                if isinstance(module, torch.nn.Linear):
                    for kind, p in module.named_parameters(recurse=False):
                        self.copies[f"{name}.{kind}"] = (p, p.detach().to(amp))
        kv_dtype = amp or model.dtype
        B = slots * group_size
        self.cache = SlotCache(t.num_hidden_layers, slots, group_size, t.num_key_value_heads, prefix_len,
                               max_new_tokens, t.head_dim, kv_dtype, device)
        self.tokens = torch.zeros(B, dtype=torch.long, device=device)   # each row's last token (the next fed)
        self.lengths = torch.zeros(B, dtype=torch.long, device=device)  # response tokens sampled so far
        self.done = torch.ones(B, dtype=torch.bool, device=device)      # stopped, at max_new_tokens, or free
        # each row's uniform for every response position, drawn at admission (uniforms_t): the step only gathers
        self.uniform = torch.zeros(B, max_new_tokens if self.temperature else 0, dtype=torch.float64, device=device)
        self.base_pos = torch.zeros(B, dtype=torch.long, device=device)  # M-RoPE position of response token 0
        # responses, with a scratch column N that rows already done write into (no branch in the step)
        self.out_tokens = torch.zeros(B, max_new_tokens + 1, dtype=torch.long, device=device)
        self.out_logprobs = torch.zeros(B, max_new_tokens + 1, dtype=torch.float32, device=device)
        self.is_stop = torch.zeros(t.vocab_size, dtype=torch.bool, device=device)
        self.positions = torch.arange(max_new_tokens, device=device)
        self.freq = inv_freq(t.head_dim, t.rope_theta).to(device)
        self.rows, self.length = B, max_new_tokens  # the bucket the next step runs (host-set ints)
        self.graphs = {}  # (rows, length) -> torch.cuda.CUDAGraph
        self.capture_s = 0.0

    def autocast(self):
        dev = self.model.device.type
        return torch.autocast(dev, dtype=self.amp) if self.amp is not None else torch.autocast(dev, enabled=False)

    def refresh_weights(self) -> None:
        for live, copy in self.copies.values():
            copy.copy_(live)

    def weight_pointers(self) -> tuple:
        """Addresses of every tensor the step reads from the model (its copies are ours): graphs are valid while
        these hold (in-place optimizer updates keep them; reloading or resharding does not)."""
        return tuple(p.data_ptr() for name, p in self.decoder.named_parameters() if name not in self.copies)

    # ---- the step ----
    def step(self) -> None:
        """One token for each of the first `self.rows` rows, attending `self.length` response positions. Device
        work only: no .item(), no host copies, no data-dependent Python branches (tests/test_engine.py)."""
        R, Ls, N = self.rows, self.length, self.N
        tokens, lengths, done = self.tokens[:R], self.lengths[:R], self.done[:R]
        cache = self.cache
        fed = (lengths - 1).clamp(min=0)  # response position of the token fed now (its keys/values go there)
        cache.rows, cache.length, cache.write_at = R, Ls, fed
        own = torch.zeros(R, Ls, device=fed.device).masked_fill_(self.positions[:Ls] >= lengths[:, None],
                                                                   float("-inf"))  # own tokens so far, this one too
        cache.bias = torch.cat((cache.prefix_bias[:R], own), dim=1)
        x = self.model.language_model.embed_tokens(tokens)[:, None]  # (R, 1, C)
        cos, sin = text_cos_sin(self.base_pos[:R] + fed, self.freq, x.dtype)
        if self.copies:
            logits = torch.func.functional_call(self.decoder, {n: c for n, (_, c) in self.copies.items()},
                                                (x, cos[:, None], sin[:, None], cache), tie_weights=False)
        else:
            logits = self.decoder(x, cos[:, None], sin[:, None], cache)
        u = None if self.temperature == 0 else self.uniform[:R].gather(1, lengths.clamp(max=N - 1)[:, None])[:, 0]
        new, logp = sample(logits, u, self.temperature, self.top_k, self.top_p)
        active = ~done
        at = torch.where(active, lengths, N)[:, None]  # rows already done write into the scratch column
        self.out_tokens[:R].scatter_(1, at, new[:, None])
        self.out_logprobs[:R].scatter_(1, at, logp[:, None])
        lengths += active
        done |= active & (self.is_stop[new] | (lengths >= N))
        tokens.copy_(torch.where(active, new, tokens))

    def run(self, rows: int, length: int) -> None:
        self.rows, self.length = rows, length
        graph = self.graphs.get((rows, length))
        if graph is not None:
            graph.replay()
        else:
            with self.autocast():
                self.step()

    def capture(self, rows_list: list[int], lengths_list: list[int]) -> None:
        """One CUDA graph per (rows, length) bucket, largest first, all in one memory pool (the step's temporaries
        are freed at the end of each capture, so smaller graphs reuse the largest one's blocks). Each shape runs
        once eagerly first (kernel selection, cuBLAS workspaces); this scribbles on the state, which the engine
        resets afterwards."""
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        shapes = [(r, n) for r in sorted(rows_list, reverse=True) for n in sorted(lengths_list, reverse=True)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), self.autocast():
            for r, n in shapes:
                self.rows, self.length = r, n
                self.step()
        torch.cuda.current_stream().wait_stream(side)
        with self.autocast():
            for r, n in shapes:
                self.rows, self.length = r, n
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.step()
                self.graphs[(r, n)] = graph
        torch.cuda.synchronize()
        self.reset()
        self.capture_s = time.perf_counter() - t0

    def reset(self) -> None:
        """Every slot free."""
        for t in (self.tokens, self.lengths, self.base_pos):
            t.zero_()
        self.done.fill_(True)
        self.cache.prefix_bias.zero_()

    # ---- host-side moves between steps ----
    def admit(self, slots: list[int], prompts: list[dict], keys: list[int], pad_token_id: int) -> int:
        """Prefill prompts into free slots and sample each row's first token; keys: the G row keys of each prompt.
        Returns the prefill's KV bytes (held next to the slots until this returns)."""
        G, N = self.G, self.N
        with self.autocast():
            logits, kv = prefill(self.model, prompts, pad_token_id)
        T = kv.length
        for j, (s, p) in enumerate(zip(slots, prompts)):
            n = p["input_ids"].numel()  # this prompt's tokens sit at the end of the left-padded prefill
            self.cache.pk[:, s, :, :n] = kv.k[:, j, :, T - n:T]
            self.cache.pv[:, s, :, :n] = kv.v[:, j, :, T - n:T]
            self.cache.prefix_bias[s * G:(s + 1) * G, :n] = 0.0
            self.cache.prefix_bias[s * G:(s + 1) * G, n:] = float("-inf")
        device = self.tokens.device
        rows = torch.tensor([s * G + j for s in slots for j in range(G)], device=device)
        u = None
        if self.temperature:
            mixed = torch.tensor([_as_int64(splitmix64(k)) for k in keys], device=device)
            self.uniform[rows] = uniforms_t(mixed[:, None], torch.arange(N, device=device)[None, :])
            u = self.uniform[rows, 0]
        first, logp = sample(logits.repeat_interleave(G, dim=0), u, self.temperature, self.top_k, self.top_p)
        self.tokens[rows] = first
        self.lengths[rows] = 1
        self.base_pos[rows] = kv.next_position.repeat_interleave(G)
        self.out_tokens[rows, 0], self.out_logprobs[rows, 0] = first, logp.float()
        self.done[rows] = self.is_stop[first] | (N == 1)
        return kv.k.numel() * kv.k.element_size() * 2

    def move(self, src: int, dst: int, used: int) -> None:
        """Move the group in slot src to the free slot dst (its first `used` response positions are live)."""
        G, c = self.G, self.cache
        a, b = slice(src * G, (src + 1) * G), slice(dst * G, (dst + 1) * G)
        c.pk[:, dst], c.pv[:, dst] = c.pk[:, src], c.pv[:, src]
        c.sk[:, b, :, :used], c.sv[:, b, :, :used] = c.sk[:, a, :, :used], c.sv[:, a, :, :used]
        c.prefix_bias[b] = c.prefix_bias[a]
        for t in (self.tokens, self.lengths, self.done, self.uniform, self.base_pos, self.out_tokens,
                  self.out_logprobs):
            t[b] = t[a]
        self.done[a] = True
