"""The rollout engine: G samples per prompt for GRPO from one image encoding and one prefill per prompt, decoded by
one static-shape step (rollout/step.py) that a CUDA graph replays on a GPU and that runs eagerly on a CPU. This file is the
host's side: input checks, buckets, and the scheduler. `sample.generate` is the one-call front door; the trainer keeps
an Engine, so that its buffers and graphs outlive a step.

    engine = Engine(model, kv_budget_bytes=8 << 30)
    rollout = engine.generate(prompts, group_size=8, max_new_tokens=512, stop_token_ids=stops, prompt_seeds=seeds)

A call runs in three kinds of moves:
  1. admit: waiting prompts are prefilled together (the model's plain forward) into free group slots
     (rollout/kv_slots.py: each prompt's keys/values stored once, each row's response keys/values on its own),
     as many groups as the KV budget holds; each of the G rows samples its first token from the prompt's logits;
  2. step: every row feeds its last token through the decoder (the model's own forward with the SlotCache), samples
     the next token on the device, writes it and its log-prob, and marks rows that stop. No host synchronisation;
     its shapes depend only on the (rows, response length) bucket, so on CUDA it is captured once per bucket into a
     CUDA graph and replayed;
  3. check, every `check_every` steps: the host reads which groups are done (the one synchronisation), collects
     them, frees their slots and admits waiting prompts (continuous batching). When nothing waits, live groups move
     down into the lowest slots, so that later steps run fewer rows.
A row's samples depend only on its prompt seed and sample index (see rollout/randomness.py), not on the batch it ran in.
"""
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from rollout.randomness import row_keys

from rollout.step import DecodeState


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
        state = DecodeState(self.model, None, slots, G, Tp, N, sampling, amp)
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
        samples depend only on (prompt_seeds[i] or (seed, i), sample index): see rollout/randomness.py. stats: kv_cache_bytes
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
