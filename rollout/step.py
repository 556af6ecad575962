"""The device side of a rollout: the prefill, and DecodeState, the static-shape decode step that a CUDA graph replays on a
GPU and that runs eagerly on a CPU. rollout/engine.py schedules prompts through it (admit, step, look); this file is
what runs on the device.

One DecodeState serves every call of an engine (sampled rollouts and greedy evaluation alike): the paged key/value
store is allocated once for the KV budget, the per-row state for the most rows, prompt blocks and new tokens asked so
far (these only grow), and a step's CUDA graph is captured the first time its StepShape runs and replayed after.
"""
import time
from typing import NamedTuple

import torch

from model.processor import left_pad
from model.rope import inv_freq, text_cos_sin
from rollout.randomness import _as_int64, splitmix64, uniforms_t
from rollout.sampling import sample
from rollout.weights import RolloutWeights


class Sampling(NamedTuple):
    temperature: float  # 0 = greedy
    top_k: int          # 0 = off
    top_p: float        # 1 = off


class StepShape(NamedTuple):
    """What one captured step is specialised to: Python values the step's code branches or sizes on."""
    rows: int            # rows the step runs (a multiple of group_size): the first `rows` rows of the state
    length: int          # response positions it attends (>= every row's length; paged: a multiple of the block size)
    group_size: int      # G: rows r of group slot r // G share that slot's prompt
    max_new_tokens: int  # a row stops at this many tokens
    sampling: Sampling


# ----------------------------------------------------------------------------- prefill

def prefill(model, prompts: list[dict], pad_token_id: int, extra_slots: int = 0):
    """One forward over the left-padded prompts (images encoded here, once): (last logits (P, V), KVCache)."""
    ids, mask, pixels, grid = left_pad(prompts, pad_token_id, model.device)
    cache = model.new_cache(len(prompts), ids.shape[1] + extra_slots)
    logits = model(ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid, cache=cache,
                   logits_to_keep=1)
    return logits[:, -1], cache


def decoder_layer_step(layer, x, cos, sin, attention):
    """One decoder layer of a decode step: the unit `--compile_rollout` compiles once and every layer reuses (its
    weights and its pages come in as arguments)."""
    return layer(x, cos, sin, None, attention)


# ----------------------------------------------------------------------------- the decode state

class DecodeState:
    """weights: what the step reads (rollout/weights.py); kv: the key/value store (rollout/kv_pages.py). The per-row
    state holds `rows` rows; rows of group slot s are s*G .. s*G + G - 1 for the call's G."""

    def __init__(self, weights: RolloutWeights, kv, slots: int, rows: int, max_new_tokens: int, prompt_len: int,
                 cuda_graphs: bool, layer_step=decoder_layer_step):
        self.weights, self.amp, self.kv = weights, weights.amp, kv
        t = weights.module.config.text
        device = weights.live.device
        self.is_stop = torch.zeros(t.vocab_size, dtype=torch.bool, device=device)
        self.freq = inv_freq(t.head_dim, t.rope_theta).to(device)
        self.cuda_graphs, self.layer_step = cuda_graphs, layer_step
        self.graphs = {}           # StepShape -> torch.cuda.CUDAGraph
        self.graph_weights = None  # weights.key() the graphs were captured with
        self.capture_s = 0.0       # seconds spent capturing graphs, in all
        self.slots = self.rows = self.max_new_tokens = self.prompt_len = 0
        self.ensure(slots, rows, max_new_tokens, prompt_len)

    def ensure(self, slots: int, rows: int, max_new_tokens: int, prompt_len: int) -> bool:
        """Grow the store's tables (or reservation) and the per-row state to hold this many group slots, rows, new
        tokens and prompt tokens (never shrink: a later smaller call reuses them). Returns True if anything was
        reallocated (the graphs are then dropped)."""
        want = (max(slots, self.slots), max(rows, self.rows), max(max_new_tokens, self.max_new_tokens),
                max(prompt_len, self.prompt_len))
        if want == (self.slots, self.rows, self.max_new_tokens, self.prompt_len):
            return False
        self.slots, self.rows, self.max_new_tokens, self.prompt_len = want
        rows, N = self.rows, self.max_new_tokens
        self.kv.resize(self.slots, rows, self.prompt_len, N)
        device = self.is_stop.device
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)   # each row's last token (the next fed)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)  # response tokens sampled so far
        self.done = torch.ones(rows, dtype=torch.bool, device=device)      # stopped, at max_new_tokens, or free
        # each row's uniform for every response position, drawn at admission (uniforms_t): the step only gathers
        self.uniform = torch.zeros(rows, N, dtype=torch.float64, device=device)
        self.base_pos = torch.zeros(rows, dtype=torch.long, device=device)  # M-RoPE position of response token 0
        # responses, with a scratch column N that rows already done write into (no branch in the step)
        self.out_tokens = torch.zeros(rows, N + 1, dtype=torch.long, device=device)
        self.out_logprobs = torch.zeros(rows, N + 1, dtype=torch.float32, device=device)
        self.graphs.clear()
        return True

    def autocast(self):
        """The trainer's autocast, without its cast cache: autocast keeps the bf16 cast of a leaf tensor that requires
        grad (LoRA's adapters) until the outermost autocast region exits, so a step inside the trainer's region would
        read a cast made before the last optimizer update (and a graph replay, memory freed since). PyTorch asks for
        cache_enabled=False around graphed callables for the same reason."""
        dev = self.is_stop.device.type
        if self.amp is None:
            return torch.autocast(dev, enabled=False)
        return torch.autocast(dev, dtype=self.amp, cache_enabled=False)

    # ---- the step
    def step(self, shape: StepShape) -> None:
        """One token for each of the first shape.rows rows, attending shape.length response positions. Device work
        only: no .item(), no host copies, no data-dependent Python branches (tests/test_engine.py). Call it under
        torch.no_grad() (run() does)."""
        R, N = shape.rows, shape.max_new_tokens
        tokens, lengths, done = self.tokens[:R], self.lengths[:R], self.done[:R]
        net = self.weights.module
        attention = self.kv.attention(R, shape.group_size, shape.length, lengths)
        fed = (lengths - 1).clamp(min=0)  # response position of the token fed now
        x = net.language_model.embed_tokens(tokens[:, None])  # (R, 1, C) (not a view: every layer's x alike)
        cos, sin = text_cos_sin(self.base_pos[:R] + fed, self.freq, x.dtype)
        cos, sin = cos[:, None], sin[:, None]
        for store, layer in zip(self.kv.layers(), net.language_model.layers):
            x = self.layer_step(layer, x, cos, sin, attention.for_layer(store))
        h = net.language_model.norm(x)[:, 0]  # (R, C)
        head = net.lm_head
        if h.device.type == "cpu" and head.bias is None:
            # (W h^T)^T, a transposed view: MKL runs this wide, thin product (V x C by C x R) about twice as fast as
            # h W^T (1.8 vs 0.8 ms for bench/sampler.py's 8 rows x 8192-token vocabulary, 2026-12-04). On a GPU the
            # logits must stay row-major for the sampling kernels.
            logits = torch.mm(head.weight.to(h.dtype), h.t()).t()
        else:
            logits = head(h)  # (R, V)
        temperature, top_k, top_p = shape.sampling
        u = None if temperature == 0 else self.uniform[:R].gather(1, lengths.clamp(max=N - 1)[:, None])[:, 0]
        new, logp = sample(logits, u, temperature, top_k, top_p)
        active = ~done
        at = torch.where(active, lengths, self.max_new_tokens)[:, None]  # rows already done write the scratch column
        self.out_tokens[:R].scatter_(1, at, new[:, None])
        self.out_logprobs[:R].scatter_(1, at, logp[:, None])
        lengths += active
        done |= active & (self.is_stop[new] | (lengths >= N))
        tokens.copy_(torch.where(active, new, tokens))

    def refresh(self) -> None:
        """Before a call: the held weight copies take the live values; graphs captured over other weights (a reload
        moved them) or other adapter flags (the reference, adapters off) are dropped."""
        self.weights.refresh()
        weights = self.weights.key()
        if weights != self.graph_weights:
            self.graphs.clear()
            self.graph_weights = weights

    @torch.no_grad()
    def run(self, shape: StepShape) -> None:
        """One step: a graph replay when this shape was captured, else the eager step (and, with CUDA graphs, the
        capture of this shape for the next time: the eager run is a real step, the capture records without
        running)."""
        graph = self.graphs.get(shape)
        if graph is not None:
            graph.replay()
            return
        if not self.cuda_graphs:
            with self.autocast():
                self.step(shape)
            return
        t0 = time.perf_counter()
        side = torch.cuda.Stream()  # the warm-up (kernel selection, cuBLAS workspaces) off the capture's stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), self.autocast():
            self.step(shape)
        torch.cuda.current_stream().wait_stream(side)
        if not hasattr(self, "pool"):
            self.pool = torch.cuda.graph_pool_handle()  # every graph in one memory pool
        graph = torch.cuda.CUDAGraph()
        with self.autocast(), torch.cuda.graph(graph, pool=self.pool):
            self.step(shape)
        self.graphs[shape] = graph
        torch.cuda.synchronize()
        self.capture_s += time.perf_counter() - t0

    # ---- host-side moves between steps
    def free_rows(self, rows: list[int]) -> None:
        """These rows hold nothing: done, no response blocks."""
        if rows:
            idx = torch.tensor(rows, device=self.done.device)
            self.done[idx] = True
            self.lengths[idx] = 0
            self.kv.clear_rows(rows)

    def admit(self, groups: list, prompts: list[dict], keys: list[int], pad_token_id: int, shape: StepShape) -> int:
        """Prefill prompts into their groups' prompt blocks and sample each row's first token. groups: scheduler
        Groups (slot, prompt_blocks); keys: the G row keys of each prompt. Returns the prefill's KV bytes (held
        next to the store until this returns)."""
        G, N = shape.group_size, shape.max_new_tokens
        temperature, top_k, top_p = shape.sampling
        with self.autocast():
            logits, kv = prefill(self.weights.module, prompts, pad_token_id)
        T = kv.length
        for j, (g, p) in enumerate(zip(groups, prompts)):
            n = p["input_ids"].numel()  # this prompt's tokens sit at the end of the left-padded prefill
            self.kv.write_prompt(g.slot, g.prompt_blocks, kv.k[:, j, :, T - n:T], kv.v[:, j, :, T - n:T])
        device = self.tokens.device
        rows = torch.tensor([g.slot * G + j for g in groups for j in range(G)], device=device)
        self.kv.clear_rows(rows.tolist())
        u = None
        if temperature:
            mixed = torch.tensor([_as_int64(splitmix64(k)) for k in keys], device=device)
            self.uniform[rows, :N] = uniforms_t(mixed[:, None], torch.arange(N, device=device)[None, :])
            u = self.uniform[rows, 0]
        first, logp = sample(logits.repeat_interleave(G, dim=0), u, temperature, top_k, top_p)
        self.tokens[rows] = first
        self.lengths[rows] = 1
        self.base_pos[rows] = kv.next_position.repeat_interleave(G)
        self.out_tokens[rows, 0], self.out_logprobs[rows, 0] = first, logp.float()
        self.done[rows] = self.is_stop[first] | (N == 1)
        return kv.k.numel() * kv.k.element_size() * 2

    def move(self, src: int, dst: int, group_size: int, used: int) -> None:
        """Move the group in slot src to the free slot dst: its tables and row state (the pages stay where they are).
        used: response positions written so far."""
        G = group_size
        a, b = slice(src * G, (src + 1) * G), slice(dst * G, (dst + 1) * G)
        self.kv.move_group(src, dst, a, b, used)
        for t in (self.tokens, self.lengths, self.done, self.base_pos, self.uniform):
            t[b] = t[a]
        self.out_tokens[b, :used + 1] = self.out_tokens[a, :used + 1]
        self.out_logprobs[b, :used + 1] = self.out_logprobs[a, :used + 1]
        self.done[a] = True
        self.lengths[a] = 0
