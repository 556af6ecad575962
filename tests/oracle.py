"""The test oracles: the slow obvious versions the rollout engine (rollout/) and the training forward
(model/prefix.py) are checked against, and the check that the decode step compiles as one graph.

reference_generate: greedy, one prompt at a time, a full cache-free forward over the whole sequence per step.
oracle_generate: sampling as the engine defines it (same uniforms, same filtering), with each prompt prefilled G
times into a plain KVCache and one module forward per step for all rows (finished rows run on as padding): no
shared prefix, no slots, no buckets, no graphs, Python-side randomness.
masked_grouped_logits: the shared-prefix training forward as it was before it dropped its masks, kept whole: dense
(B, 1, T, Tp + T) masks, keys and values repeated to every query head, the whole (B, R, V) logits (bench/
update_memory.py measures it against today's).
"""
import torch

from model.decoder import KeyMask, attention, causal_mask

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


# ----------------------------------------------------------------------------- the training forward, masked

class MaskedPrefixRecorder:
    """Cache stand-in for the prompt pass: plain causal attention over left-padded prompts, keys/values kept."""

    def __init__(self, num_layers: int, batch_size: int, device, attn_impl: str = "sdpa"):
        self.k, self.v = [None] * num_layers, [None] * num_layers
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)  # an empty cache
        self.valid = None  # (U, Tp) real prompt tokens
        self.attn_impl = attn_impl
        self._mask = None

    def append(self, new_mask: torch.Tensor, next_position: torch.Tensor) -> None:
        self.valid = new_mask.bool()
        self.next_position = next_position
        self._mask = causal_mask(self.valid)

    def attend(self, layer_idx: int, q, k, v):
        # keep the first pass's tensors: activation checkpointing re-runs a block in backward, and the recomputed
        # k/v (equal values, a graph of their own) need not be kept alive
        if self.k[layer_idx] is None:
            self.k[layer_idx], self.v[layer_idx] = k, v
        return attention(q, k, v, self._mask, self.attn_impl)


class MaskedSharedPrefix:
    """Cache stand-in for the row pass: row b sees its prompt's real tokens, then its own tokens causally (right
    padding masked). The prompt's keys/values reach the rows by expand when there is one prompt, else by index."""

    def __init__(self, prefix: MaskedPrefixRecorder, row_prompt: torch.Tensor, row_mask: torch.Tensor,
                 attn_impl: str = "sdpa"):
        B, T = row_mask.shape
        dev = row_mask.device
        self.prefix, self.attn_impl, self.row_prompt = prefix, attn_impl, row_prompt
        self.single = prefix.valid.shape[0] == 1
        own = torch.ones(T, T, dtype=torch.bool, device=dev).tril()[None] & row_mask.bool()[:, None, :]
        own = own | torch.eye(T, dtype=torch.bool, device=dev)[None]  # a padding query sees itself: finite
        pre = prefix.valid[row_prompt][:, None, :].expand(B, T, -1)
        self._mask = KeyMask(torch.cat([pre, own], dim=-1)[:, None])  # (B, 1, T, Tp - 1 + T)
        self.next_position = torch.zeros(B, dtype=torch.long, device=dev)

    def append(self, new_mask, next_position) -> None:
        pass  # positions are given explicitly; the mask was built from the row mask

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(self.row_prompt.numel(), -1, -1, -1) if self.single else x[self.row_prompt]

    def attend(self, layer_idx: int, q, k, v):
        K = torch.cat([self._rows(self.prefix.k[layer_idx]), k], dim=2)
        V = torch.cat([self._rows(self.prefix.v[layer_idx]), v], dim=2)
        return attention(q, K, V, self._mask, self.attn_impl)


def masked_grouped_logits(net, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, pixel_values, image_grid_thw,
                   response_ids: torch.Tensor, response_mask: torch.Tensor, row_prompt: torch.Tensor):
    """(logits (B, R, V) predicting each of the B rows' R response tokens, anchor): add the 0-valued scalar
    `anchor` to the loss (see below; it changes no value or gradient).

    prompt_ids/prompt_mask (U, Tp): the distinct prompts, left-padded; pixel_values/image_grid_thw: their images
    (or None); response_ids/response_mask (B, R): right-padded responses; row_prompt (B,): each row's prompt."""
    U, Tp = prompt_ids.shape
    if Tp < 2 or bool((prompt_ids[:, -1] == net.config.image_token_id).any()):
        raise ValueError("grouped_logits needs prompts of >= 2 tokens that end in text (the chat template's "
                         "assistant header); use the per-row forward (--shared_prefix=false)")
    grid = image_grid_thw if pixel_values is not None else None
    positions, _ = net.rope_index(prompt_ids, grid, prompt_mask.bool())  # (3, U, Tp), the whole prompt
    prefix = MaskedPrefixRecorder(net.config.text.num_hidden_layers, U, prompt_ids.device, net.config.text.attn_impl)
    prompt_out = net(prompt_ids[:, :-1], attention_mask=prompt_mask[:, :-1], position_ids=positions[:, :, :-1],
                     pixel_values=pixel_values, image_grid_thw=image_grid_thw, cache=prefix, logits_to_keep=1)
    # The prompt pass's output is not needed, only its keys/values. But FSDP2 unshards a block for backward from
    # the gradient of that block's output: the anchor (0 * output, to be added to the loss) keeps every prompt-pass
    # block output in the graph, so no block's parameters are found resharded when the k/v gradients arrive.
    anchor = prompt_out.sum() * 0.0
    B, R = response_ids.shape
    # row tokens: the prompt's last token, then response tokens 0..R-2; each predicts the next response token
    last = prompt_ids[row_prompt, -1:]
    ids = torch.cat([last, response_ids[:, :R - 1]], dim=1)
    real = torch.cat([torch.ones_like(last), response_mask[:, :R - 1].long()], dim=1)
    last_pos = positions[:, row_prompt, -1:]  # (3, B, 1)
    next_pos = positions.masked_fill(~prompt_mask.bool()[None], -1).amax(dim=(0, 2))[row_prompt] + 1  # (B,)
    pos = torch.cat([last_pos, (next_pos[:, None] + torch.arange(R - 1, device=ids.device))[None].expand(3, B, R - 1)],
                    dim=2)
    cache = MaskedSharedPrefix(prefix, row_prompt, real, net.config.text.attn_impl)
    return net(ids, attention_mask=real, position_ids=pos, cache=cache), anchor
