"""The rollout engine: G samples per prompt for GRPO from one image encoding and one prefill per prompt, decoded by
one static-shape step that a CUDA graph replays on a GPU and that runs eagerly on a CPU. `sample.generate` is the
one-call front door; the trainer keeps an Engine, so that its buffers and graphs outlive a step.

    engine = Engine(model, kv_budget_bytes=8 << 30)
    rollout = engine.generate(prompts, group_size=8, max_new_tokens=512, stop_token_ids=stops, prompt_seeds=seeds)

A call runs in three kinds of moves:
  1. admit: waiting prompts are prefilled together (the model's plain forward) into free group slots
     (model/slot_cache.py: each prompt's keys/values stored once, each row's response keys/values on its own),
     as many groups as the KV budget holds; each of the G rows samples its first token from the prompt's logits;
  2. step: every row feeds its last token through the decoder (the model's own forward with the SlotCache), samples
     the next token on the device, writes it and its log-prob, and marks rows that stop. No host synchronisation;
     its shapes depend only on the (rows, response length) bucket, so on CUDA it is captured once per bucket into a
     CUDA graph and replayed;
  3. check, every `check_every` steps: the host reads which groups are done (the one synchronisation), collects
     them, frees their slots and admits waiting prompts (continuous batching). When nothing waits, live groups move
     down into the lowest slots, so that later steps run fewer rows.
A row's samples depend only on its prompt seed and sample index (see `uniforms`), not on the batch it ran in.
"""
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from model.rope import inv_freq, text_cos_sin
from model.slot_cache import SlotCache

MASK64 = (1 << 64) - 1


@dataclass
class Rollout:
    """B = len(prompts) * G rows; row r = prompt r // G, sample r % G. R = the longest response."""
    prompt_index: torch.Tensor   # (B,) long
    response_ids: torch.Tensor   # (B, R) long; pad_token_id past a row's end
    response_mask: torch.Tensor  # (B, R) float, 1 = part of the response (its stop token included)
    logprobs: torch.Tensor       # (B, R) float32 log softmax(logits / temperature) of each token, before top-k/top-p
                                 # filtering, as the trainer recomputes it (raw logits if greedy); 0 where masked
    finish_reason: list          # B strings: "stop" (hit a stop token) or "length" (hit max_new_tokens)
    stats: dict = field(default_factory=dict)  # see Engine.generate


# ----------------------------------------------------------------------------- input checks

def check_inputs(model, prompts, group_size, max_new_tokens, temperature, top_p, top_k, prompt_seeds,
                 pad_token_id=0) -> None:
    """Every error we can see before running the model, with the prompt index it concerns."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of Processor.encode dicts")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an integer >= 1, got {group_size!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not temperature >= 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if prompt_seeds is not None and len(prompt_seeds) != len(prompts):
        raise ValueError(f"prompt_seeds has {len(prompt_seeds)} entries for {len(prompts)} prompts")
    cfg = model.config
    if not 0 <= pad_token_id < cfg.text.vocab_size:
        raise ValueError(f"pad_token_id {pad_token_id} is not a token id of this model (vocab {cfg.text.vocab_size})")
    context = cfg.text.max_position_embeddings
    merge = cfg.vision.spatial_merge_size
    for i, p in enumerate(prompts):
        ids = p.get("input_ids") if isinstance(p, dict) else None
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.numel() == 0 or ids.is_floating_point():
            raise ValueError(f"prompt {i}: input_ids must be a non-empty 1-D integer tensor")
        T = ids.numel()
        if T > context:
            raise ValueError(f"prompt {i} has {T} tokens, longer than the model's context of {context} "
                             f"(max_position_embeddings)")
        if T + max_new_tokens > context:
            raise ValueError(f"prompt {i}: {T} prompt tokens + max_new_tokens={max_new_tokens} exceed the model's "
                             f"context of {context} (max_position_embeddings); lower max_new_tokens")
        if int(ids.min()) < 0 or int(ids.max()) >= cfg.text.vocab_size:
            raise ValueError(f"prompt {i}: token ids must be in [0, {cfg.text.vocab_size}), got "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        pixels, grid = p.get("pixel_values"), p.get("image_grid_thw")
        n_pads = int((ids == cfg.image_token_id).sum())
        if (pixels is None) != (grid is None):
            raise ValueError(f"prompt {i}: pixel_values and image_grid_thw must be given together")
        if grid is None:
            if n_pads:
                raise ValueError(f"prompt {i} holds {n_pads} image placeholder tokens but no image")
            continue
        if grid.dim() != 2 or grid.shape[1] != 3 or bool((grid < 1).any()) or \
                bool((grid[:, 1:] % merge != 0).any()):
            raise ValueError(f"prompt {i}: image_grid_thw must be (n_images, 3) positive (t, h, w) with h and w "
                             f"multiples of the merge size {merge}, got {grid.tolist()}")
        n_patches = int(grid.prod(-1).sum())
        if pixels.shape[0] != n_patches:
            raise ValueError(f"prompt {i}: pixel_values has {pixels.shape[0]} patches, image_grid_thw "
                             f"{grid.tolist()} describes {n_patches}")
        if n_pads != n_patches // merge ** 2:
            raise ValueError(f"prompt {i} holds {n_pads} image placeholder tokens but its images give "
                             f"{n_patches // merge ** 2} features (grid {grid.tolist()}, merge {merge})")


# ----------------------------------------------------------------------------- randomness
# Every sample draws one uniform number per token, u = hash(row key, token index), and takes the token where u falls
# in its (filtered) CDF: inverse-CDF sampling, exact for any distribution. The row key is hash(prompt key, sample
# index) and the prompt key is prompt_seeds[i] (or hash(seed, i)), so a row's numbers depend on nothing else in the
# batch; there is no torch.Generator whose stream position would shift with batch composition, and the integers are
# the same on every device. The host derives row keys once per prompt (Python integers); at admission the device
# hashes them with every token index in int64 tensor ops (same bits: two's-complement products wrap exactly like
# uint64 ones) into a table the step gathers from, so the graph needs no per-step input and no hashing. (A token
# can only change with the batch if the batch changes the logits, i.e.
# float rounding of differently-shaped kernels moves a CDF boundary across u.)

def splitmix64(x: int) -> int:
    """A 64-bit mixing function (Steele et al., SplitMix64's output step): distinct inputs -> unrelated outputs."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def hash64(*parts: int) -> int:
    """One 64-bit key from integers, stable across processes and machines (Python's hash() is not)."""
    h = 0
    for p in parts:
        h = splitmix64(h ^ (p & MASK64))
    return h


def row_keys(seed: int, num_prompts: int, group_size: int, prompt_seeds=None) -> list[int]:
    prompt_keys = [hash64(seed, i) if prompt_seeds is None else int(prompt_seeds[i]) for i in range(num_prompts)]
    return [hash64(k, j) for k in prompt_keys for j in range(group_size)]


def uniforms(keys: list[int], step: int) -> list[float]:
    """One uniform in (0, 1) per key: the top 53 bits of hash(key, step), offset by half a step (host version)."""
    return [((hash64(k, step) >> 11) + 0.5) * 2.0 ** -53 for k in keys]


def _as_int64(x: int) -> int:
    """The int64 with the same 64 bits as the unsigned x."""
    return x - (1 << 64) if x >= 1 << 63 else x


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic: mask off the copied sign bits)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def splitmix64_t(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 on an int64 tensor, bit for bit."""
    x = x + _as_int64(0x9E3779B97F4A7C15)
    x = (x ^ _shr(x, 30)) * _as_int64(0xBF58476D1CE4E5B9)
    x = (x ^ _shr(x, 27)) * _as_int64(0x94D049BB133111EB)
    return x ^ _shr(x, 31)


def uniforms_t(mixed_keys: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """uniforms on the device: mixed_keys = splitmix64(key) (int64), step broadcast against it -> float64."""
    return (_shr(splitmix64_t(mixed_keys ^ step), 11).double() + 0.5) * 2.0 ** -53


# ----------------------------------------------------------------------------- one sampling step

def filter_logits(z: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Tempered logits (B, V) -> the same with tokens outside top-k, then outside the top-p nucleus, at -inf."""
    if 0 < top_k < z.shape[-1]:
        kth = z.topk(top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = z.sort(dim=-1, descending=True, stable=True)
        p = sorted_z.softmax(-1)
        drop = p.cumsum(-1) - p >= top_p  # mass before a token already reaches top_p; the first is always kept
        z = z.scatter(-1, order, sorted_z.masked_fill(drop, float("-inf")))
    return z


def sample(logits: torch.Tensor, u: torch.Tensor | None, temperature: float, top_k: int = 0,
           top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, V), u (B,) uniforms -> (tokens (B,), their log-probs (B,) fp32).

    The log-prob is of the unfiltered softmax(logits / temperature): what the trainer recomputes from its own
    forward (grpo.token_logprobs), so the PPO ratio starts at exactly 1. temperature 0 = argmax, raw logits."""
    z = logits.float()
    if temperature == 0:
        tokens = z.argmax(-1)
        return tokens, z.log_softmax(-1).gather(-1, tokens[:, None])[:, 0]
    if temperature != 1.0:
        z = z / temperature
    logp = z.log_softmax(-1)
    if top_k or top_p < 1.0:
        p = filter_logits(z, top_k, top_p).softmax(-1)
    else:
        p = logp.exp()
    cdf = p.cumsum(-1)  # (B, V)
    x = (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)  # scale by the total so rounding never runs past the end
    tokens = torch.searchsorted(cdf, x).squeeze(-1).clamp(max=z.shape[-1] - 1)
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]


# ----------------------------------------------------------------------------- prefill

def left_pad(prompts: list[dict], pad_token_id: int, device):
    """Processor.encode dicts -> input_ids (P, T) left-padded, attention_mask (P, T), pixel_values, grid."""
    T = max(p["input_ids"].numel() for p in prompts)
    ids = torch.full((len(prompts), T), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        n = p["input_ids"].numel()
        ids[i, T - n:] = p["input_ids"]
        mask[i, T - n:] = 1
    pix = [p["pixel_values"] for p in prompts if p.get("pixel_values") is not None]
    grid = [p["image_grid_thw"] for p in prompts if p.get("image_grid_thw") is not None]
    return (ids.to(device), mask.to(device), torch.cat(pix).to(device) if pix else None,
            torch.cat(grid).to(device) if grid else None)


def prefill(model, prompts: list[dict], pad_token_id: int, extra_slots: int = 0):
    """One forward over the left-padded prompts (images encoded here, once): (last logits (P, V), KVCache)."""
    ids, mask, pixels, grid = left_pad(prompts, pad_token_id, model.device)
    cache = model.new_cache(len(prompts), ids.shape[1] + extra_slots)
    logits = model(ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid, cache=cache,
                   logits_to_keep=1)
    return logits[:, -1], cache


# ----------------------------------------------------------------------------- buckets

def prefix_bucket(n: int) -> int:
    """Prompt slots for prompts of up to n tokens: n rounded up to a multiple of 64."""
    return -(-n // 64) * 64


def length_buckets(max_new_tokens: int) -> list[int]:
    """Response lengths a step may attend: powers of two from 16 up to N/8, then multiples of N/8 (rounded up to 16),
    so a step reads at most ~2x its keys early on and N/8 extra later, with ~10 graphs per row bucket."""
    N = max_new_tokens
    step = -(-max(16, -(-N // 8)) // 16) * 16
    out, b = [], 16
    while b < step and b < N:
        out.append(b)
        b *= 2
    out += list(range(step, N, step)) + [N]
    return sorted(set(min(b, N) for b in out))


def row_buckets(slots: int) -> list[int]:
    """Group counts a step may run: powers of two below the slot count, and the slot count."""
    return sorted({1 << i for i in range(slots.bit_length()) if 1 << i < slots} | {slots})


def _bucket(n: int, buckets: list[int]) -> int:
    return next(b for b in buckets if b >= n)


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


def _is_sharded(model) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def _has_fsdp(model) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


class DecodeState:
    """Everything one shape of generation needs on the device: the SlotCache, the per-row state, the weights the step
    reads, and the step's CUDA graphs. Built by Engine for a (G, N, prompt length, slots, sampling, precision) key and
    reused while the key holds; rows of slot s are s*G .. s*G + G - 1."""

    def __init__(self, engine: "Engine", key: tuple, slots: int, group_size: int, prefix_len: int,
                 max_new_tokens: int, sampling: tuple, amp):
        model, t = engine.model, engine.model.config.text
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


# ----------------------------------------------------------------------------- the engine

class Engine:
    """model: a Qwen-VL model (model.load / model.Qwen3VL ...), with whole (unsharded) parameters.
    kv_budget_bytes: the most KV-cache bytes a generate may hold (group slots and the prefill's cache together);
    None = every prompt at once. cuda_graphs: capture the step (default: on CUDA, except under FSDP2, whose
    forward hooks are host code a replay would skip). buckets: round rows and response lengths up to a few fixed
    sizes (default: with graphs; exact shapes otherwise). check_every: steps between looks at which rows are done."""

    def __init__(self, model, kv_budget_bytes: int | None = None, cuda_graphs: bool | None = None,
                 buckets: bool | None = None, check_every: int = 8):
        if kv_budget_bytes is not None and kv_budget_bytes <= 0:
            raise ValueError(f"kv_budget_bytes must be > 0 (or None: no limit), got {kv_budget_bytes}")
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        self.model = model
        self.kv_budget_bytes = kv_budget_bytes
        on_cuda = model.device.type == "cuda"
        self.cuda_graphs = on_cuda and not _has_fsdp(model) if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and not on_cuda:
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        self.buckets = self.cuda_graphs if buckets is None else buckets
        self.check_every = check_every
        self.state = None  # the DecodeState of the last call, reused while its key holds

    def release(self) -> None:
        """Give back the KV slots, weight copies and CUDA graphs; the next generate builds them again."""
        self.state = None
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()

    def slot_bytes(self, group_size: int, prefix_len: int, max_new_tokens: int, kv_dtype, prefill_dtype) -> int:
        """KV bytes one group slot costs, with its share of the prefill's cache (the prefill holds a prompt's keys
        and values in the model's dtype until they are copied into the slot)."""
        t = self.model.config.text
        per_token = t.num_hidden_layers * t.num_key_value_heads * t.head_dim * 2
        slot = per_token * (prefix_len + group_size * max_new_tokens) * torch.empty((), dtype=kv_dtype).element_size()
        return slot + per_token * prefix_len * torch.empty((), dtype=prefill_dtype).element_size()

    def _state_for(self, P: int, G: int, N: int, longest_prompt: int, sampling: tuple, amp) -> DecodeState:
        model = self.model
        if _is_sharded(model):
            raise ValueError("the model's parameters are sharded (FSDP2): unshard them for the rollout "
                             "(parallel.RolloutPolicy does)")
        Tp = prefix_bucket(longest_prompt) if self.buckets else longest_prompt
        per_slot = self.slot_bytes(G, Tp, N, amp or model.dtype, model.dtype)
        slots = P
        if self.kv_budget_bytes is not None:
            slots = min(P, self.kv_budget_bytes // per_slot)
            if slots < 1:
                raise ValueError(f"kv_budget_bytes={self.kv_budget_bytes} holds no group: one group of {G} rows x "
                                 f"{N} new tokens after a {Tp}-token prompt needs {per_slot} bytes")
        old = self.state
        if old is not None:
            old_bytes = old.S * self.slot_bytes(G, old.cache.prefix_len, N, amp or model.dtype, model.dtype)
            # reuse when it fits, unless its prompt slots are much longer than needed (every step reads them all)
            same = old.key[:4] == (G, N, sampling, amp) and old.S >= slots and \
                Tp <= old.cache.prefix_len <= Tp + max(64, Tp // 4) and \
                old_bytes <= (self.kv_budget_bytes or old_bytes)
            if same and old.key[4] == old.weight_pointers():
                old.refresh_weights()
                return old
            self.state = old = None  # free its memory before the new one is allocated
            if model.device.type == "cuda":
                torch.cuda.empty_cache()
        state = DecodeState(self, None, slots, G, Tp, N, sampling, amp)
        state.key = (G, N, sampling, amp, state.weight_pointers())
        if self.cuda_graphs:
            state.capture([G * b for b in row_buckets(slots)], length_buckets(N))
        self.state = state
        return state

    @torch.no_grad()
    def generate(self, prompts: list[dict], group_size: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, stop_token_ids=(), seed: int = 0, pad_token_id: int = 0,
                 prompt_seeds: list[int] | None = None) -> Rollout:
        """G samples for each prompt (Processor.encode dicts of different lengths, with or without images).

        Runs under the caller's autocast (as the trainer's forward does, so log-probs round alike). Each row's
        samples depend only on (prompt_seeds[i] or (seed, i), sample index): see uniforms(). stats: kv_cache_bytes
        (the slots), kv_peak_bytes (slots + the largest prefill cache), slots, steps, row_steps (rows computed over
        all steps), graphs, capture_s, prefill_s, decode_s."""
        model = self.model
        check_inputs(model, prompts, group_size, max_new_tokens, temperature, top_p, top_k, prompt_seeds,
                     pad_token_id)
        P, G, N = len(prompts), group_size, max_new_tokens
        dev = model.device.type
        amp = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        sampling = (float(temperature), int(top_k), float(top_p))
        longest = max(p["input_ids"].numel() for p in prompts)
        t0 = time.perf_counter()
        st = self._state_for(P, G, N, longest, sampling, amp)
        st.reset()
        st.is_stop.zero_()
        stops = sorted({int(t) for t in stop_token_ids if 0 <= int(t) < st.is_stop.numel()})
        if stops:
            st.is_stop[torch.tensor(stops, device=st.is_stop.device)] = True
        keys = row_keys(seed, P, G, prompt_seeds)
        lens = length_buckets(N) if self.buckets else None
        rows_b = row_buckets(st.S) if self.buckets else None

        waiting = deque(range(P))
        slot_prompt = [None] * st.S  # the prompt in each slot
        steps = [0] * st.S           # decode steps its group has run (lengths <= 1 + steps)
        out = [None] * P             # per prompt: (lengths (G,), tokens (G, N), logprobs (G, N)) on the host
        stats = {"prefill_s": 0.0, "steps": 0, "row_steps": 0, "kv_peak_bytes": st.cache.nbytes}
        t_setup = time.perf_counter() - t0
        t1 = time.perf_counter()
        while waiting or any(p is not None for p in slot_prompt):
            free = [s for s, p in enumerate(slot_prompt) if p is None]
            if waiting and free:
                take = [waiting.popleft() for _ in range(min(len(free), len(waiting)))]
                ta = time.perf_counter()
                prefill_bytes = st.admit(free[:len(take)], [prompts[i] for i in take],
                                         [k for i in take for k in keys[i * G:(i + 1) * G]], pad_token_id)
                stats["prefill_s"] += time.perf_counter() - ta
                stats["kv_peak_bytes"] = max(stats["kv_peak_bytes"], st.cache.nbytes + prefill_bytes)
                for s, i in zip(free, take):
                    slot_prompt[s], steps[s] = i, 0
            if not waiting:  # nothing to admit: pack live groups into the lowest slots
                live = [s for s, p in enumerate(slot_prompt) if p is not None]
                for dst, src in enumerate(live):
                    if dst != src:
                        st.move(src, dst, used=steps[src] + 1)
                        slot_prompt[dst], steps[dst], slot_prompt[src] = slot_prompt[src], steps[src], None
            live = [s for s, p in enumerate(slot_prompt) if p is not None]
            groups = live[-1] + 1
            rows = G * (_bucket(groups, rows_b) if self.buckets else groups)
            # run until the next look, or until some group is surely finished (N tokens)
            n = min(self.check_every, min(N - 1 - steps[s] for s in live))
            for _ in range(n):
                need = max(steps[s] for s in live) + 1
                st.run(rows, _bucket(need, lens) if self.buckets else need)
                for s in live:
                    steps[s] += 1
                stats["steps"] += 1
                stats["row_steps"] += rows
            group_done = st.done[:groups * G].view(groups, G).all(1).tolist()  # the one sync per look
            finished = [s for s in live if group_done[s] or steps[s] >= N - 1]
            if finished:
                idx = torch.tensor([s * G + j for s in finished for j in range(G)], device=st.tokens.device)
                lengths, tokens, logprobs = (st.lengths[idx].cpu(), st.out_tokens[idx, :N].cpu(),
                                             st.out_logprobs[idx, :N].cpu())
                for k, s in enumerate(finished):
                    rows_k = slice(k * G, (k + 1) * G)
                    out[slot_prompt[s]] = (lengths[rows_k], tokens[rows_k], logprobs[rows_k])
                    slot_prompt[s] = None
                    st.done[s * G:(s + 1) * G] = True
        stats["decode_s"] = time.perf_counter() - t1 - stats["prefill_s"]
        stats.update(kv_cache_bytes=st.cache.nbytes, slots=st.S, graphs=len(st.graphs), capture_s=st.capture_s,
                     setup_s=t_setup)
        return self._rollout(out, G, pad_token_id, st.is_stop.cpu(), stats)

    @staticmethod
    def _rollout(out, G: int, pad_token_id: int, is_stop: torch.Tensor, stats: dict) -> Rollout:
        lengths = torch.cat([o[0] for o in out])
        R = int(lengths.max())
        response_mask = (torch.arange(R)[None, :] < lengths[:, None]).float()
        tokens = torch.cat([o[1][:, :R] for o in out])
        logprobs = torch.cat([o[2][:, :R] for o in out])
        last = tokens.gather(1, (lengths - 1)[:, None])[:, 0]
        return Rollout(
            prompt_index=torch.arange(len(out)).repeat_interleave(G),
            response_ids=torch.where(response_mask.bool(), tokens, torch.full_like(tokens, pad_token_id)),
            response_mask=response_mask,
            logprobs=logprobs * response_mask,
            finish_reason=["stop" if bool(is_stop[t]) else "length" for t in last.tolist()],
            stats=stats,
        )
