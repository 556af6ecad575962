"""Group sampling for GRPO: G samples per prompt from one image encoding and one prefill per prompt, whose KV
the G rows share (model/group_cache.py). Library (`generate`, `reference_generate`) and CLI:

    python sample.py --model DIR --image cat.png --prompt "Is this safe?" --n 4 \
        [--labels image_tag=safe,text_tag=safe,combine_tag=safe]
"""
import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from model.group_cache import GroupCache

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
    stats: dict = field(default_factory=dict)  # kv_cache_bytes, row_steps, prefill_s, decode_s


# ----------------------------------------------------------------------------- input checks

def check_inputs(model, prompts, group_size, max_new_tokens, temperature, top_p, top_k, prompt_seeds,
                 max_cache_len=None, pad_token_id=0) -> None:
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
        if max_cache_len is not None and T + max_new_tokens - 1 > max_cache_len:
            raise ValueError(f"prompt {i}: {T} prompt tokens + {max_new_tokens - 1} cached response tokens do not "
                             f"fit the KV cache of {max_cache_len} slots per row")
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
# Every sample draws one uniform number per step, u = hash(row key, step), and takes the token where u falls in
# its (filtered) CDF: inverse-CDF sampling, exact for any distribution. The row key is hash(prompt key, sample
# index) and the prompt key is prompt_seeds[i] (or hash(seed, i)), so a row's numbers depend on nothing else in
# the batch; there is no torch.Generator whose stream position would shift with batch composition, and the
# integers are the same on every device. One number per row and step costs nothing next to the model, where a
# Gumbel-max race would need V hashed numbers per row and step. (A token can only change with the batch if
# the batch changes the logits, i.e. float rounding of differently-shaped kernels moves a CDF boundary across u.)

def splitmix64(x: int) -> int:
    """A 64-bit mixing function (Steele et al., SplitMix64's output step): distinct inputs -> unrelated outputs."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def hash64(*parts: int) -> int:
    h = 0
    for p in parts:
        h = splitmix64(h ^ (p & MASK64))
    return h


def row_keys(seed: int, num_prompts: int, group_size: int, prompt_seeds=None) -> list[int]:
    prompt_keys = [hash64(seed, i) if prompt_seeds is None else int(prompt_seeds[i]) for i in range(num_prompts)]
    return [hash64(k, j) for k in prompt_keys for j in range(group_size)]


def uniforms(keys: list[int], step: int) -> list[float]:
    """One uniform in (0, 1) per key: the top 53 bits of hash(key, step), offset by half a step."""
    return [((hash64(k, step) >> 11) + 0.5) * 2.0 ** -53 for k in keys]


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


# ----------------------------------------------------------------------------- model calls

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


def decode_one_token(model, tokens: torch.Tensor, cache, mask: torch.Tensor | None = None) -> torch.Tensor:
    """tokens (B,) -> next-token logits (B, V). Positions come straight from the cache (a text token gets the
    same id on the three M-RoPE axes), which skips rope_index's per-step bookkeeping. The obvious path, and the
    oracle of model.decode_step (see fast_decode)."""
    B = tokens.shape[0]
    position_ids = cache.next_position.view(1, B, 1).expand(3, B, 1)
    return model(tokens[:, None], attention_mask=None if mask is None else mask[:, None],
                 position_ids=position_ids, cache=cache)[:, -1]


def fast_decode(model) -> bool:
    """Whether generate may step with model.decode_step (the same math as decode_one_token in fewer tensor ops,
    reading weights directly). Not while a parameter is a sharded FSDP2 DTensor: an FSDP2 model outside
    parallel.RolloutPolicy (which keeps every block unsharded for the rollout) takes the module path."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support has no DTensors
        return True
    return not any(isinstance(p, DTensor) for p in model.parameters())


# ----------------------------------------------------------------------------- generate

@torch.no_grad()
def generate(model, prompts: list[dict], group_size: int, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, stop_token_ids=(), seed: int = 0, pad_token_id: int = 0,
             prompt_seeds: list[int] | None = None, share_prefix: bool = True,
             max_cache_len: int | None = None) -> Rollout:
    """G samples for each prompt (Processor.encode dicts of different lengths, with or without images).

    share_prefix=False prefills every prompt G times (a plain KVCache of B rows, the way HF generate does it):
    the slow obvious path, kept for tests and benchmarks. max_cache_len caps the KV slots of a row (prompt +
    response). Each row's samples depend only on (prompt_seeds[i] or (seed, i), sample index): see uniforms()."""
    check_inputs(model, prompts, group_size, max_new_tokens, temperature, top_p, top_k, prompt_seeds, max_cache_len,
                 pad_token_id)
    P, G, N = len(prompts), group_size, max_new_tokens
    B = P * G
    stop_ids = torch.tensor(sorted({int(t) for t in stop_token_ids}), dtype=torch.long)
    keys = row_keys(seed, P, G, prompt_seeds)

    t0 = time.perf_counter()
    if share_prefix:
        logits, prefix = prefill(model, prompts, pad_token_id)
        cache = GroupCache(prefix, G, N - 1)
        del prefix  # GroupCache keeps its keys/values; the prefill's attention mask can go
        logits = logits.repeat_interleave(G, dim=0)  # (B, V): the G rows start from the same prompt logits
        kv_bytes = cache.nbytes
    else:
        logits, cache = prefill(model, [p for p in prompts for _ in range(G)], pad_token_id, extra_slots=N - 1)
        kv_bytes = cache.k.numel() * cache.k.element_size() * 2
    t1 = time.perf_counter()
    # checked after the prefill: FSDP2 reshards a block (back to DTensors) at the end of its forward
    next_logits = model.decode_step if share_prefix and fast_decode(model) else \
        (lambda tokens, cache: decode_one_token(model, tokens, cache))

    response_ids = torch.full((B, N), pad_token_id, dtype=torch.long)
    logprobs = torch.zeros(B, N, dtype=torch.float32)
    lengths = torch.zeros(B, dtype=torch.long)
    stopped = torch.zeros(B, dtype=torch.bool)
    rows = torch.arange(B)  # the rows still generating, in row order (what the cache holds, when it can drop rows)
    row_steps = 0
    for step in range(N):
        live = rows if share_prefix else torch.arange(B)  # the rows `logits` belongs to
        u = None if temperature == 0 else \
            torch.tensor(uniforms([keys[r] for r in live.tolist()], step), dtype=torch.float64, device=logits.device)
        tokens, lp = sample(logits, u, temperature, top_k, top_p)
        tokens, lp = tokens.cpu(), lp.float().cpu()
        if not share_prefix:  # every row ran; keep the active ones
            tokens, lp = tokens[rows], lp[rows]
        response_ids[rows, step], logprobs[rows, step], lengths[rows] = tokens, lp, step + 1
        hit = torch.isin(tokens, stop_ids)
        stopped[rows[hit]] = True
        if step == N - 1 or bool(hit.all()):
            break
        if bool(hit.any()):
            rows, tokens = rows[~hit], tokens[~hit]
            if share_prefix:  # finished rows leave the batch: no more compute for them
                cache.keep((~hit).nonzero()[:, 0])
        if share_prefix:
            logits = next_logits(tokens.to(model.device), cache)
            row_steps += rows.numel()
        else:  # a plain KVCache cannot drop rows: finished rows run on as padding
            full = torch.full((B,), pad_token_id, dtype=torch.long)
            full[rows] = tokens
            mask = torch.zeros(B, dtype=torch.bool)
            mask[rows] = True
            logits = decode_one_token(model, full.to(model.device), cache, mask.to(model.device))
            row_steps += B
    t2 = time.perf_counter()

    R = int(lengths.max())
    response_mask = (torch.arange(R)[None, :] < lengths[:, None]).float()
    return Rollout(
        prompt_index=torch.arange(P).repeat_interleave(G),
        response_ids=response_ids[:, :R],
        response_mask=response_mask,
        logprobs=logprobs[:, :R] * response_mask,
        finish_reason=["stop" if s else "length" for s in stopped.tolist()],
        stats={"kv_cache_bytes": kv_bytes, "row_steps": row_steps, "prefill_s": t1 - t0, "decode_s": t2 - t1},
    )


@torch.no_grad()
def reference_generate(model, prompts: list[dict], max_new_tokens: int, stop_token_ids=()) -> list[list[int]]:
    """The test oracle: greedy, one prompt at a time, a full cache-free forward over the whole sequence per step."""
    out = []
    for p in prompts:
        ids = p["input_ids"].to(model.device)[None]
        pixels, grid = p.get("pixel_values"), p.get("image_grid_thw")
        kw = {} if pixels is None else dict(pixel_values=pixels.to(model.device), image_grid_thw=grid.to(model.device))
        new = []
        for _ in range(max_new_tokens):
            token = int(model(ids, **kw)[0, -1].argmax())
            new.append(token)
            if token in stop_token_ids:
                break
            ids = torch.cat([ids, torch.tensor([[token]], device=ids.device)], dim=1)
        out.append(new)
    return out


# ----------------------------------------------------------------------------- CLI

LABEL_KEYS = ("image_tag", "text_tag", "combine_tag")


def parse_labels(spec: str) -> dict:
    """'image_tag=safe,text_tag=unsafe,combine_tag=unsafe' -> dict, all three keys, values safe/unsafe."""
    labels = {}
    for item in spec.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or key not in LABEL_KEYS or value.strip().lower() not in ("safe", "unsafe"):
            raise ValueError(f"--labels: bad item {item!r}; expected e.g. image_tag=safe,text_tag=unsafe,"
                             f"combine_tag=unsafe")
        labels[key] = value.strip().lower()
    missing = [k for k in LABEL_KEYS if k not in labels]
    if missing:
        raise ValueError(f"--labels: missing {', '.join(missing)} (need {', '.join(LABEL_KEYS)})")
    return labels


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Sample G responses from a checkpoint for one image + prompt.")
    ap.add_argument("--model", required=True, help="checkpoint directory (config.json, safetensors, tokenizer)")
    ap.add_argument("--image", action="append", default=[], help="image file; repeat for several, omit for text only")
    ap.add_argument("--prompt", required=True, help="the user's question")
    ap.add_argument("--n", type=int, default=4, help="group size G: samples to draw")
    ap.add_argument("--max_new_tokens", type=int, default=512, help="response length limit")
    ap.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    ap.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    ap.add_argument("--top_k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    ap.add_argument("--seed", type=int, default=0, help="samples depend only on (seed, sample index)")
    ap.add_argument("--labels", default=None,
                    help="reference tags, e.g. image_tag=safe,text_tag=unsafe,combine_tag=unsafe: print rewards")
    ap.add_argument("--no_step_guided", action="store_true", help="send the question without the step-guided prompt")
    ap.add_argument("--prompt_file", default=None, help="a file with your own step-guided instruction")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_cli(args)
    except (ValueError, TypeError, KeyError, OSError) as e:  # OSError covers FileNotFoundError
        print(f"error: {e}", file=sys.stderr)
        return 2


def run_cli(args) -> int:
    import model as model_lib
    import rewards
    from data.prompt import build_prompt

    # Everything cheap first, so that bad input fails before the model is read.
    labels = parse_labels(args.labels) if args.labels is not None else None
    for path in args.image:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--image: file not found: {path}")
    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"--model: checkpoint directory not found: {args.model}")
    processor = model_lib.load_processor(args.model)  # raises if the checkpoint has no tokenizer
    text = args.prompt if args.no_step_guided else build_prompt(args.prompt, args.prompt_file)
    encoded = processor.encode(text, args.image)
    net = model_lib.load(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    ro = generate(net, [encoded], group_size=args.n, max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                  stop_token_ids=processor.stop_token_ids, seed=args.seed, pad_token_id=processor.pad_token_id)
    for r in range(args.n):
        ids = ro.response_ids[r][ro.response_mask[r].bool()].tolist()
        text = processor.decode(ids, skip_special_tokens=True)  # as the trainer decodes it for the reward
        print(f"=== sample {r} ({len(ids)} tokens, {ro.finish_reason[r]}) ===")
        print(text)
        if labels is not None:
            reward, components = rewards.score(text, labels)
            print(f"--- reward {reward:.3f} " + json.dumps(components, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
