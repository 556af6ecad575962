"""The rollout engine: G samples per prompt for GRPO from one image encoding and one prefill per prompt, decoded by
one static-shape step (rollout/step.py) that a CUDA graph replays on a GPU and that runs eagerly on a CPU. This file is
the host's side: input checks, buckets, and the loop that drives the scheduler (rollout/scheduler.py) and the device.
`sample.generate` is the one-call front door; the trainer keeps an Engine, so that its store and graphs outlive a step.

    engine = Engine(model, kv_budget_bytes=8 << 30)
    rollout = engine.generate(prompts, group_size=8, max_new_tokens=512, stop_token_ids=stops, prompt_seeds=seeds)

A call runs in three kinds of moves:
  1. admit: waiting prompts are prefilled together (the model's plain forward) into blocks of the paged key/value
     store (rollout/kv_pages.py: each prompt's keys/values stored once, each row's response in blocks of its own), as
     many as the free blocks hold; each of the G rows samples its first token from the prompt's logits;
  2. step: every row feeds its last token through the decoder, samples the next token on the device, writes it and
     its log-prob, and marks rows that stop. No host synchronisation; its shapes depend only on the StepShape
     (rows, response length bucket, G, sampling), so on CUDA it is captured once per shape into a CUDA graph;
  3. look, every `check_every` steps: the host reads which rows stopped (the one synchronisation); stopped rows give
     back their blocks, finished groups are collected, waiting prompts are admitted (continuous batching), rows get
     the blocks their next steps need (a full store preempts the newest group, recomputed later with the same random
     numbers). When nothing waits, live groups move down into the lowest slots, so that later steps run fewer rows.
A row's samples depend only on its prompt seed and sample index (see rollout/randomness.py), not on the batch it ran
in, on the budget, or on preemption.
"""
import time
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from rollout.randomness import row_keys
from rollout.kv_pages import PagedKV, ReservedKV
from rollout.scheduler import Scheduler, blocks_for
from rollout.step import DecodeState, Sampling, StepShape, decoder_layer_step
from rollout.weights import RolloutWeights

BLOCK_SIZE = 16  # tokens per key/value block (divides every response length bucket)


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
                 pad_token_id=0, stop_token_ids=()) -> None:
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
    outside = sorted({int(t) for t in stop_token_ids if not 0 <= int(t) < cfg.text.vocab_size})
    if outside:  # dropping them would let every row run to max_new_tokens
        raise ValueError(f"stop token ids {outside[:5]} are not token ids of this model (vocab {cfg.text.vocab_size}): "
                         f"the tokenizer and the model disagree")
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


# ----------------------------------------------------------------------------- buckets

def length_buckets(max_new_tokens: int) -> list[int]:
    """Response lengths a step may attend: powers of two from 16 up to N/8, then multiples of N/8 (rounded up to 16),
    so a step reads at most ~2x its keys early on and N/8 extra later, with ~10 graphs per row bucket. All are
    multiples of the block size."""
    N = -(-max_new_tokens // BLOCK_SIZE) * BLOCK_SIZE
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


def paged_plan(text_config, budget_bytes: int, prompt_lens: list[int], group_size: int, kv_dtype, prefill_dtype,
               max_prompt_len: int = 0) -> tuple[int, int, int]:
    """How a KV budget is spent on a call (Engine._plan, bench/kv_plan.py): (blocks of the paged store, prompts per
    prefill, group slots). An eighth of the budget (at least one longest prompt) is set aside for the prefill's plain
    cache of the prompts being admitted; the rest is blocks. Group slots: the most groups that could be in flight,
    each holding its prompt's blocks and at least one block per row."""
    t = text_config
    per_token = t.num_hidden_layers * t.num_key_value_heads * t.head_dim * 2
    size = lambda dtype: torch.empty((), dtype=dtype).element_size()  # noqa: E731
    capacity = max(max(prompt_lens), max_prompt_len)
    prompt_cache = per_token * capacity * size(prefill_dtype)
    prefill = max(budget_bytes // 8, prompt_cache)
    blocks = max(1, (budget_bytes - prefill) // (per_token * BLOCK_SIZE * size(kv_dtype)))  # too few: the scheduler
    per_prefill = max(1, prefill // prompt_cache)                                          # says so
    slots = max(1, min(len(prompt_lens), (blocks - 1) // (blocks_for(min(prompt_lens), BLOCK_SIZE) + group_size)))
    return blocks, per_prefill, slots


@lru_cache(maxsize=None)
def compiled_layer_step():
    """decoder_layer_step compiled once per process: every layer, shape and engine reuses the one compilation (the
    layer's weights, its pages and the step's tensors are inputs; every size is symbolic, sizes that happen to be
    equal or 1 at the first call are not assumed to stay so)."""
    import torch.fx.experimental._config as fx_config
    compiled = torch.compile(decoder_layer_step, dynamic=True, fullgraph=True)

    def layer_step(*args):
        with fx_config.patch(use_duck_shape=False, backed_size_oblivious=True):
            if layer_step.compile_s is not None:
                return compiled(*args)
            t0 = time.perf_counter()
            out = compiled(*args)  # the first call compiles
            layer_step.compile_s = time.perf_counter() - t0
            return out
    layer_step.compile_s = None
    return layer_step


# ----------------------------------------------------------------------------- the engine

class Engine:
    """model: a Qwen-VL model (model.load / model.Qwen3VL ...), plain or sharded by FSDP2 (the engine then decodes
    from a whole copy of its weights, rollout/weights.py). kv_budget_bytes: the most key/value bytes a generate may
    hold (the block store and the prefill's cache together); None = every prompt at once. cuda_graphs: capture the
    step (default: on CUDA). buckets: round rows and response lengths up to a few fixed sizes (default: with graphs;
    else lengths are only rounded up to whole blocks). check_every: steps between looks at which rows are done.
    max_prompt_len: the prompt capacity the state is sized for (default: the longest prompt seen so far, growing; the
    trainer passes its data's longest so that the state is built once). compile: run each decoder layer of the step
    through torch.compile (one compilation for every layer and shape)."""

    def __init__(self, model, kv_budget_bytes: int | None = None, cuda_graphs: bool | None = None,
                 buckets: bool | None = None, check_every: int = 8, max_prompt_len: int | None = None,
                 compile: bool = False):
        if kv_budget_bytes is not None and kv_budget_bytes <= 0:
            raise ValueError(f"kv_budget_bytes must be > 0 (or None: no limit), got {kv_budget_bytes}")
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        self.model = model
        self.kv_budget_bytes = kv_budget_bytes
        on_cuda = model.device.type == "cuda"
        self.cuda_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and not on_cuda:
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        self.buckets = self.cuda_graphs if buckets is None else buckets
        self.check_every, self.max_prompt_len, self.compile = check_every, max_prompt_len, compile
        self.state = None     # the DecodeState every call shares
        self.builds = 0       # allocations of the store and per-row state (1 in steady state)

    @property
    def compile_s(self) -> float | None:
        """Seconds the compilation of the decoder layer took (None: not compiled, or not yet)."""
        return compiled_layer_step().compile_s if self.compile else None

    def release(self) -> None:
        """Give back the key/value store, weight copies and CUDA graphs; the next generate builds them again."""
        self.state = None
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()

    def block_bytes(self, kv_dtype) -> int:
        t = self.model.config.text
        return t.num_hidden_layers * t.num_key_value_heads * BLOCK_SIZE * 2 * t.head_dim * \
            torch.empty((), dtype=kv_dtype).element_size()

    def prefill_bytes(self, prompts: int, tokens: int) -> int:
        """The prefill's plain cache for `prompts` prompts of `tokens` tokens (the model's dtype)."""
        t = self.model.config.text
        return 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * prompts * tokens * \
            torch.empty((), dtype=self.model.dtype).element_size()

    def _plan(self, prompt_lens: list[int], G: int, kv_dtype) -> tuple[int, int, int]:
        """(blocks of a paged store or 0 for a reservation, prompts per prefill, group slots) for a call: with a
        budget, paged_plan; without, a reservation for every prompt at once."""
        if self.kv_budget_bytes is None:
            return 0, len(prompt_lens), len(prompt_lens)
        return paged_plan(self.model.config.text, self.kv_budget_bytes, prompt_lens, G, kv_dtype, self.model.dtype,
                          self.max_prompt_len or 0)

    def _state(self, prompt_lens: list[int], G: int, N: int, amp) -> tuple[DecodeState, int, int]:
        """The shared state, built on the first call (or when a call needs a bigger paged store, or the precision
        changed), grown in place when a call needs more rows, new tokens or prompt capacity."""
        kv_dtype = amp or self.model.dtype
        blocks, per_prefill, slots = self._plan(prompt_lens, G, kv_dtype)
        capacity = max(max(prompt_lens), self.max_prompt_len or 0)
        if self.buckets:
            capacity = -(-capacity // 64) * 64  # prompt capacity in steps of 64 tokens
        st = self.state
        paged = self.kv_budget_bytes is not None
        if st is None or st.amp != amp or st.kv.reserved == paged or (paged and st.kv.num_blocks < blocks):
            self.state = st = None  # free the old store before the new one is allocated
            if self.model.device.type == "cuda":
                torch.cuda.empty_cache()
            t = self.model.config.text
            shape = (t.num_hidden_layers, t.num_key_value_heads, t.head_dim)
            kv = PagedKV(*shape, blocks, BLOCK_SIZE, kv_dtype, self.model.device) if paged else \
                ReservedKV(*shape, BLOCK_SIZE, kv_dtype, self.model.device)
            layer_step = compiled_layer_step() if self.compile else decoder_layer_step
            st = DecodeState(RolloutWeights(self.model, amp), kv, slots, slots * G, N, capacity, self.cuda_graphs,
                             layer_step)
            self.state = st
            self.builds += 1
        elif st.ensure(slots, slots * G, N, capacity):
            self.builds += 1
        st.refresh()
        return st, per_prefill, min(slots, st.rows // G)

    def _begin(self, prompts, G: int, N: int, stop_token_ids, amp):
        """The shared state ready for a call (rows free, stop tokens set) and the call's scheduler."""
        prompt_lens = [p["input_ids"].numel() for p in prompts]
        st, per_prefill, slots = self._state(prompt_lens, G, N, amp)
        st.free_rows(list(range(st.rows)))
        st.is_stop.zero_()
        stops = sorted({int(t) for t in stop_token_ids})
        if stops:
            st.is_stop[torch.tensor(stops, device=st.is_stop.device)] = True
        sched = Scheduler(st.kv.blocks_for_call(G, N, slots), BLOCK_SIZE, G, N, slots, prompt_lens,
                          reserve_full=st.kv.reserved)
        return st, sched, per_prefill

    def _admit(self, st: DecodeState, sched: Scheduler, prompts, keys, pad_token_id: int, shape: StepShape,
               per_prefill: int | None) -> int:
        """Admit what fits, a prefill batch at a time; returns the largest prefill cache in bytes."""
        G, most = shape.group_size, 0
        while new := sched.admit(self.check_every, limit=per_prefill):
            most = max(most, st.admit(new, [prompts[g.prompt] for g in new],
                                      [k for g in new for k in keys[g.prompt * G:(g.prompt + 1) * G]],
                                      pad_token_id, shape))
            st.kv.set_response_blocks(sched.row_entries(new))
        return most

    @torch.no_grad()
    def ready(self, prompts: list[dict], group_size: int, max_new_tokens: int, steps: int, temperature: float = 1.0,
              top_p: float = 1.0, top_k: int = 0, stop_token_ids=(), seed: int = 0) -> tuple[DecodeState, StepShape]:
        """The state with every prompt admitted and blocks for `steps` decode steps, and the StepShape that runs
        them (for tests and benchmarks of the bare step: `state.step(shape)`). Runs under the caller's autocast."""
        P, G, N = len(prompts), group_size, max_new_tokens
        check_inputs(self.model, prompts, G, N, temperature, top_p, top_k, None, 0, stop_token_ids)
        dev = self.model.device.type
        amp = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        st, sched, _ = self._begin(prompts, G, N, stop_token_ids, amp)
        sampling = Sampling(float(temperature), int(top_k), float(top_p))
        length = blocks_for(min(steps + 1, N), BLOCK_SIZE) * BLOCK_SIZE
        shape = StepShape(P * G, length, G, N, sampling)
        self._admit(st, sched, prompts, row_keys(seed, P, G), 0, shape, None)
        if len(sched.live) < P:
            raise ValueError(f"ready(): the KV budget holds {len(sched.live)} of the {P} prompts at once")
        st.kv.set_response_blocks(sched.grow(steps)[1])
        return st, shape

    @torch.no_grad()
    def generate(self, prompts: list[dict], group_size: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, stop_token_ids=(), seed: int = 0, pad_token_id: int = 0,
                 prompt_seeds: list[int] | None = None) -> Rollout:
        """G samples for each prompt (Processor.encode dicts of different lengths, with or without images).

        Runs under the caller's autocast (as the trainer's forward does, so log-probs round alike). Each row's
        samples depend only on (prompt_seeds[i] or (seed, i), sample index): see rollout/randomness.py. stats:
        kv_store (paged under a budget, else reserved), kv_cache_bytes (the store), kv_peak_bytes (the store + the largest prefill cache), kv_held_peak_bytes (blocks
        in use at most), slots (groups the step can run), steps, row_steps (rows computed over all steps),
        rows_in_flight (unfinished rows per step, on average), preemptions, graphs, capture_s (this call's graph
        captures), builds (state allocations so far), prefill_s, decode_s, setup_s."""
        model = self.model
        check_inputs(model, prompts, group_size, max_new_tokens, temperature, top_p, top_k, prompt_seeds,
                     pad_token_id, stop_token_ids)
        P, G, N = len(prompts), group_size, max_new_tokens
        dev = model.device.type
        amp = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        t0 = time.perf_counter()
        st, sched, per_prefill = self._begin(prompts, G, N, stop_token_ids, amp)
        keys = row_keys(seed, P, G, prompt_seeds)
        sampling = Sampling(float(temperature), int(top_k), float(top_p))
        lens = length_buckets(N) if self.buckets else None
        rows_b = row_buckets(sched.slots) if self.buckets else None
        block = self.block_bytes(st.amp or model.dtype)
        out = [None] * P  # per prompt: (lengths (G,), tokens (G, N), logprobs (G, N)) on the host
        stats = {"prefill_s": 0.0, "steps": 0, "row_steps": 0, "live_row_steps": 0, "kv_peak_bytes": st.kv.nbytes,
                 "kv_held_peak_bytes": 0}
        capture_before = st.capture_s
        t_setup = time.perf_counter() - t0
        t1 = time.perf_counter()
        while sched.waiting or sched.live:
            # 1. admit waiting prompts while their blocks fit, a prefill batch at a time
            ta = time.perf_counter()
            prefill_bytes = self._admit(st, sched, prompts, keys, pad_token_id, StepShape(0, 0, G, N, sampling),
                                        per_prefill)
            stats["prefill_s"] += time.perf_counter() - ta
            stats["kv_peak_bytes"] = max(stats["kv_peak_bytes"], st.kv.nbytes + prefill_bytes)
            for src, dst in sched.compact():  # nothing waits: pack live groups into the lowest slots
                st.move(src, dst, G, used=sched.live[dst].steps + 1)
            # 2. blocks for the next run of steps (a full store preempts the newest group), then the steps
            n = min(self.check_every, min(N - 1 - g.steps for g in sched.live.values()))
            preempted, entries = sched.grow(n)
            for g in preempted:
                st.free_rows(list(range(g.slot * G, (g.slot + 1) * G)))
            st.kv.set_response_blocks(entries)
            stats["kv_held_peak_bytes"] = max(stats["kv_held_peak_bytes"], sched.held() * block)
            groups = sched.groups_in_step()
            rows = G * (_bucket(groups, rows_b) if self.buckets else groups)
            live_rows = sched.live_rows()
            for _ in range(n):
                need = max(g.steps for g in sched.live.values()) + 1
                # the paged store attends whole blocks; the reserved one exact lengths, except compiled (a compiled
                # layer gave other tokens than eager at some exact lengths: tests/test_engine_step.py)
                exact = st.kv.reserved and not self.compile
                length = _bucket(need, lens) if self.buckets else need if exact else \
                    blocks_for(need, BLOCK_SIZE) * BLOCK_SIZE
                st.run(StepShape(rows, length, G, N, sampling))
                sched.stepped(1)
                stats["steps"] += 1
                stats["row_steps"] += rows
                stats["live_row_steps"] += live_rows
            # 3. look: which rows stopped (the one synchronisation), collect finished groups
            looked = torch.stack((st.done[:groups * G].long(), st.lengths[:groups * G])).view(2, groups, G).tolist()
            freed, finished = sched.looked({s: [bool(d) for d in looked[0][s]] for s in sched.live},
                                           {s: looked[1][s] for s in sched.live})
            st.kv.clear_rows([s * G + j for s, j in freed])
            if finished:
                idx = torch.tensor([g.slot * G + j for g in finished for j in range(G)], device=st.tokens.device)
                lengths, tokens, logprobs = (st.lengths[idx].cpu(), st.out_tokens[idx, :N].cpu(),
                                             st.out_logprobs[idx, :N].cpu())
                for k, g in enumerate(finished):
                    rows_k = slice(k * G, (k + 1) * G)
                    out[g.prompt] = (lengths[rows_k], tokens[rows_k], logprobs[rows_k])
                st.free_rows(idx.tolist())
        stats["decode_s"] = time.perf_counter() - t1 - stats["prefill_s"]
        stats["rows_in_flight"] = stats.pop("live_row_steps") / max(stats["steps"], 1)
        stats.update(kv_store="reserved" if st.kv.reserved else "paged", kv_cache_bytes=st.kv.nbytes,
                     slots=sched.slots, graphs=len(st.graphs),
                     capture_s=st.capture_s - capture_before, preemptions=sched.preemptions, builds=self.builds,
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
