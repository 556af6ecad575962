"""The sampler's test oracles: the slow obvious versions the rollout engine (rollout/) is checked against, and
the check that its decode step compiles as one graph.

reference_generate: greedy, one prompt at a time, a full cache-free forward over the whole sequence per step.
oracle_generate: sampling as the engine defines it (same uniforms, same filtering), with each prompt prefilled G
times into a plain KVCache and one module forward per step for all rows (finished rows run on as padding): no
shared prefix, no slots, no buckets, no graphs, Python-side randomness.
"""
import torch

from rollout.engine import Rollout
from rollout.randomness import row_keys, uniforms
from rollout.sampling import sample
from rollout.step import prefill


@torch.no_grad()
def reference_generate(model, prompts: list[dict], max_new_tokens: int, stop_token_ids=()) -> list[list[int]]:
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


def decode_one_token(model, tokens: torch.Tensor, cache, mask: torch.Tensor | None = None) -> torch.Tensor:
    """tokens (B,) -> next-token logits (B, V) through the model's forward; positions from the cache (a text token
    has the same id on the three M-RoPE axes)."""
    B = tokens.shape[0]
    position_ids = cache.next_position.view(1, B, 1).expand(3, B, 1)
    return model(tokens[:, None], attention_mask=None if mask is None else mask[:, None],
                 position_ids=position_ids, cache=cache)[:, -1]


@torch.no_grad()
def oracle_generate(model, prompts: list[dict], group_size: int, max_new_tokens: int, temperature: float = 1.0,
                    top_p: float = 1.0, top_k: int = 0, stop_token_ids=(), seed: int = 0, pad_token_id: int = 0,
                    prompt_seeds=None) -> Rollout:
    P, G, N = len(prompts), group_size, max_new_tokens
    B = P * G
    stop_ids = torch.tensor(sorted({int(t) for t in stop_token_ids}), dtype=torch.long)
    keys = row_keys(seed, P, G, prompt_seeds)
    logits, cache = prefill(model, [p for p in prompts for _ in range(G)], pad_token_id, extra_slots=N - 1)
    response_ids = torch.full((B, N), pad_token_id, dtype=torch.long)
    logprobs = torch.zeros(B, N)
    lengths = torch.zeros(B, dtype=torch.long)
    active = torch.ones(B, dtype=torch.bool)
    stopped = torch.zeros(B, dtype=torch.bool)
    for step in range(N):
        u = None if temperature == 0 else torch.tensor(uniforms(keys, step), dtype=torch.float64)
        tokens, lp = sample(logits, u, temperature, top_k, top_p)
        tokens, lp = tokens.cpu(), lp.float().cpu()
        response_ids[active, step], logprobs[active, step] = tokens[active], lp[active]
        lengths[active] = step + 1
        hit = torch.isin(tokens, stop_ids) & active
        stopped |= hit
        active &= ~hit
        if step == N - 1 or not bool(active.any()):
            break
        fed = torch.where(active, tokens, torch.full_like(tokens, pad_token_id))
        logits = decode_one_token(model, fed.to(model.device), cache, active.to(model.device))
    R = int(lengths.max())
    mask = (torch.arange(R)[None, :] < lengths[:, None]).float()
    return Rollout(prompt_index=torch.arange(P).repeat_interleave(G), response_ids=response_ids[:, :R],
                   response_mask=mask, logprobs=logprobs[:, :R] * mask,
                   finish_reason=["stop" if s else "length" for s in stopped.tolist()])


STEP_STATE = ("tokens", "lengths", "done", "out_tokens", "out_logprobs")


def check_step_compiles(st, shape) -> None:
    """torch.compile(fullgraph=True) fails on any graph break (a data-dependent branch, a host read): the CPU check
    that a DecodeState's step is capturable as one graph. Two compiled steps do what two eager ones did."""
    before = {k: getattr(st, k).clone() for k in STEP_STATE}
    store = {k: t.clone() for k, t in vars(st.kv).items() if isinstance(t, torch.Tensor)}  # keys, values, tables
    with torch.no_grad(), st.autocast():
        st.step(shape)
        st.step(shape)
    eager = {k: getattr(st, k).clone() for k in STEP_STATE}
    for k, v in before.items():
        getattr(st, k).copy_(v)
    for k, t in store.items():
        getattr(st.kv, k).copy_(t)
    torch._dynamo.reset()
    compiled = torch.compile(st.step, fullgraph=True, backend="aot_eager")
    with torch.no_grad(), st.autocast():
        compiled(shape)
        compiled(shape)
    for k in STEP_STATE:
        assert torch.allclose(getattr(st, k).float(), eager[k].float(), atol=1e-5), k
    assert int((st.lengths - before["lengths"]).sum()) > 0  # the steps did something
