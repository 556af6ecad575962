"""The training forward: log-probs (and entropies) of rollout tokens under a model (the policy being trained, or the
frozen reference), a micro-batch of rows at a time, and the per-token math that turns hidden states into them.

With shared_prefix (the default) the rows' distinct prompts run once and their G rows attend to them
(model/prefix.py); otherwise every row is [its prompt | its response] with the prompt recomputed G times (collate).
Positions and image slots come from the prompt alone, and response positions continue as text, exactly as the
rollout engine decoded them, so the sampler's log-probs and these agree (tests/test_engine.py).
The forward stops at the last hidden states; log-probs and entropies come out of the LM head chunk by chunk
(head_logprobs), fp32, with the chunk recomputed in backward: the (B, T, V) logits of a long response (V ~150k for
Qwen-VL) and their gradient never exist whole. token_logprobs / token_entropy do the same from given logits.
Micro-batches are a fixed number of rows, or packed by tokens (micro_batches); the sampler computes the same log-prob
(rollout/sampling.py).
"""
import torch
import torch.nn.functional as F

from model.prefix import GroupedForward, grouped_hidden
from model.processor import left_pad
from runtime.parallel import autocast_ctx


# ----------------------------------------------------------------------------- log-probs and entropies of logits

def _chunks(B, T, chunk_size):
    """(batch slice, time slice) pairs covering (B, T) with at most chunk_size rows each; always views."""
    if B == 0 or T == 0:
        return
    if T <= chunk_size:
        nb = max(1, chunk_size // T)  # several whole sequences per chunk
        for b in range(0, B, nb):
            yield slice(b, b + nb), slice(0, T)
    else:  # long sequences: split the time axis of one sequence at a time
        for b in range(B):
            for t in range(0, T, chunk_size):
                yield slice(b, b + 1), slice(t, t + chunk_size)


def _scaled_fp32(chunk, temperature):
    z = chunk.float()  # (b, t, V) fp32 copy of one chunk only
    return z if temperature == 1.0 else z / temperature


class _TokenLogprobs(torch.autograd.Function):
    """log_softmax(logits / T).gather(tokens), one chunk of rows at a time, forward and backward.

    Autograd through a python loop of chunks would save every chunk's fp32 softmax for backward, i.e. the
    full (B, T, V) fp32 tensor again. This Function saves only the logits (already alive for the model's
    own backward) and recomputes each chunk's softmax in backward: d logp / d logits = (onehot - p) / T.
    """

    @staticmethod
    def forward(ctx, logits, tokens, temperature, chunk_size):
        B, T, V = logits.shape
        out = torch.empty(B, T, dtype=torch.float32, device=logits.device)
        for bs, ts in _chunks(B, T, chunk_size):
            # same op, row by row, as the naive version: equal to it, not just close
            lsm = torch.log_softmax(_scaled_fp32(logits[bs, ts], temperature), dim=-1)
            out[bs, ts] = lsm.gather(-1, tokens[bs, ts].unsqueeze(-1)).squeeze(-1)
            del lsm  # one chunk's temporaries alive at a time
        ctx.save_for_backward(logits, tokens)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # grad_out (B, T)
        logits, tokens = ctx.saved_tensors
        B, T, V = logits.shape
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for bs, ts in _chunks(B, T, ctx.chunk_size):
            g = torch.softmax(_scaled_fp32(logits[bs, ts], ctx.temperature), dim=-1).neg_()  # -p
            g.scatter_add_(-1, tokens[bs, ts].unsqueeze(-1), torch.ones_like(g[..., :1]))  # onehot - p
            g.mul_(grad_out[bs, ts].float().unsqueeze(-1) / ctx.temperature)
            grad[bs, ts] = g  # cast back to the logits dtype, as autograd through .float() would
            del g
        return grad, None, None, None


def token_logprobs(logits, tokens, temperature=1.0, chunk_size=512):
    """fp32 log-probs (B, T) of tokens (B, T) under logits (B, T, V) / temperature; (B, V) + (B,) also works.

    Peak extra memory O(chunk_size * V) fp32 instead of O(B * T * V); differentiable w.r.t. logits.
    Equals token_logprobs_reference (the naive version) to fp32 rounding on any input dtype.
    """
    if logits.dim() not in (2, 3) or tuple(tokens.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"token_logprobs: logits must be (B, T, V) or (B, V) with tokens (B, T) or (B,); "
                         f"got logits {tuple(logits.shape)}, tokens {tuple(tokens.shape)}")
    if not logits.is_floating_point() or tokens.is_floating_point():
        raise ValueError(f"token_logprobs: logits must be float and tokens integer, got {logits.dtype} "
                         f"and {tokens.dtype}")
    if not temperature > 0 or chunk_size < 1:
        raise ValueError(f"token_logprobs: need temperature > 0 and chunk_size >= 1, got {temperature}, "
                         f"{chunk_size}")
    if logits.dim() == 2:  # one position per row (e.g. a decode step)
        return token_logprobs(logits.unsqueeze(1), tokens.unsqueeze(1), temperature, chunk_size).squeeze(1)
    return _TokenLogprobs.apply(logits, tokens.long(), float(temperature), int(chunk_size))


def token_logprobs_reference(logits, tokens, temperature=1.0):
    """The obvious version, kept as the oracle: holds a full fp32 (B, T, V) log-softmax."""
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


class _TokenEntropy(torch.autograd.Function):
    """Entropy of softmax(logits / T) per position, chunked like _TokenLogprobs.
    H = logsumexp(z) - sum_v p_v z_v, and dH/dz_v = -p_v (z_v - sum_u p_u z_u), z = logits / T."""

    @staticmethod
    def forward(ctx, logits, temperature, chunk_size):
        B, T, V = logits.shape
        out = torch.empty(B, T, dtype=torch.float32, device=logits.device)
        for bs, ts in _chunks(B, T, chunk_size):
            z = _scaled_fp32(logits[bs, ts], temperature)
            out[bs, ts] = torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(dim=-1)
            del z
        ctx.save_for_backward(logits)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # grad_out (B, T)
        (logits,) = ctx.saved_tensors
        B, T, V = logits.shape
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for bs, ts in _chunks(B, T, ctx.chunk_size):
            z = _scaled_fp32(logits[bs, ts], ctx.temperature)
            p = torch.softmax(z, dim=-1)
            z = z - (p * z).sum(dim=-1, keepdim=True)  # z - E_p[z]
            grad[bs, ts] = p.mul_(z).mul_(-grad_out[bs, ts].float().unsqueeze(-1) / ctx.temperature)
            del z, p
        return grad, None, None


def token_entropy(logits, temperature=1.0, chunk_size=512):
    """fp32 entropy (B, T) of softmax(logits (B, T, V) / temperature); differentiable, O(chunk * V) extra."""
    if logits.dim() != 3 or not logits.is_floating_point():
        raise ValueError(f"token_entropy: logits must be float (B, T, V), got {tuple(logits.shape)} {logits.dtype}")
    return _TokenEntropy.apply(logits, float(temperature), int(chunk_size))


class _HeadLogprobs(torch.autograd.Function):
    """Per-token log-probs and entropies of softmax(h W^T / T) from the last hidden states h (N, C) and the LM head
    W (V, C), without ever holding the (N, V) logits or their gradient (at Qwen-VL's 151,936-token vocabulary they
    are the largest tensors of a training step):
      forward: a chunk of positions at a time, each against the whole vocabulary; keeps only each position's
               logsumexp and E_p[z] (two floats);
      backward: a slice of the vocabulary at a time, for every position: the slice's logits are recomputed, its
               probabilities come from the kept logsumexp, and its rows of dL/dW are computed once, whole (so no
               (V, C) gradient is summed over chunks); dL/dh adds up over the slices in fp32.
    The products run under the caller's autocast (saved here and restored in backward), as the LM head would, so
    values and gradients equal lm_head -> token_logprobs / token_entropy up to the order of float sums.
    d logp / dz = onehot - p;  d H / dz = -p (z - E_p[z]);  z = h W^T / T."""

    @staticmethod
    def forward(ctx, hidden, weight, tokens, temperature, chunk_size, entropy_grad):
        N = hidden.shape[0]
        device = hidden.device.type
        ctx.amp = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
        logp, entropy, lse, mean_z = (torch.empty(N, dtype=torch.float32, device=hidden.device) for _ in range(4))
        for s in range(0, N, chunk_size):
            z = _scaled_fp32(F.linear(hidden[s:s + chunk_size], weight), temperature)  # (c, V), one chunk only
            lse[s:s + chunk_size] = torch.logsumexp(z, dim=-1)
            mean_z[s:s + chunk_size] = (torch.softmax(z, dim=-1) * z).sum(dim=-1)
            logp[s:s + chunk_size] = z.gather(-1, tokens[s:s + chunk_size, None])[:, 0] - lse[s:s + chunk_size]
            del z
        torch.sub(lse, mean_z, out=entropy)
        ctx.save_for_backward(hidden, weight, tokens, lse, mean_z)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.set_materialize_grads(False)
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, tokens, lse, mean_z = ctx.saved_tensors
        T = ctx.temperature
        enabled, dtype = ctx.amp
        N, V = hidden.shape[0], weight.shape[0]
        slice_rows = max(1, 4 * ctx.chunk_size * V // max(N, 1))  # a slice's buffers ~4 forward chunks each
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if ctx.needs_input_grad[0] \
            else None
        grad_w = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        with torch.autocast(hidden.device.type, dtype=dtype, enabled=enabled):
            for v0 in range(0, V, slice_rows):
                w = weight[v0:v0 + slice_rows]
                logits = F.linear(hidden, w)  # (N, v): every position, this slice of the vocabulary
                z = _scaled_fp32(logits, T)
                p = torch.exp(z - lse[:, None])
                g = torch.zeros_like(z)
                if grad_logp is not None:  # (onehot - p) * dL/dlogp
                    gl = grad_logp.float()
                    g.sub_(p * gl[:, None])
                    here = (tokens >= v0) & (tokens < v0 + w.shape[0])
                    rows = here.nonzero()[:, 0]
                    g[rows, tokens[rows] - v0] += gl[rows]
                if grad_entropy is not None:  # -p (z - E_p[z]) * dL/dH
                    g.sub_(p * (z - mean_z[:, None]) * grad_entropy.float()[:, None])
                g = g.div_(T).to(logits.dtype)  # back to the logits' dtype, as autograd through .float() would
                if grad_h is not None:
                    grad_h.add_(torch.matmul(g, w))
                if grad_w is not None:
                    grad_w[v0:v0 + slice_rows] = torch.matmul(g.t(), hidden)
                del logits, z, p, g
        return None if grad_h is None else grad_h.to(hidden.dtype), grad_w, None, None, None, None


def head_logprobs(hidden, head_weight, tokens, temperature=1.0, mask=None, chunk_size=256, entropy_grad=False):
    """(fp32 log-probs (B, T), fp32 entropies (B, T)) of tokens (B, T) under softmax(hidden (B, T, C) W^T /
    temperature), W = head_weight (V, C): the LM head and the two statistics in chunks of chunk_size positions
    (_HeadLogprobs). mask (B, T): only these positions go through the head (0 elsewhere), so right padding costs no
    vocabulary-wide work. The entropies carry a gradient only with entropy_grad (an entropy bonus)."""
    B, T, C = hidden.shape
    if tuple(tokens.shape) != (B, T):
        raise ValueError(f"head_logprobs: hidden {tuple(hidden.shape)} and tokens {tuple(tokens.shape)} disagree")
    flat, ids = hidden.reshape(B * T, C), tokens.reshape(B * T).long()
    where = None if mask is None else mask.reshape(B * T).bool().nonzero()[:, 0]
    if where is not None:
        flat, ids = flat.index_select(0, where), ids[where]
    logp, entropy = _HeadLogprobs.apply(flat, head_weight, ids, float(temperature), int(chunk_size),
                                        bool(entropy_grad))
    if where is None:
        return logp.view(B, T), entropy.view(B, T)
    zeros = torch.zeros(B * T, dtype=torch.float32, device=hidden.device)
    return zeros.index_put((where,), logp).view(B, T), zeros.index_put((where,), entropy).view(B, T)


# ----------------------------------------------------------------------------- the training forward

def collate(prompts: list[dict], response_ids: torch.Tensor, response_mask: torch.Tensor, pad_id: int, device,
            rope_index, image_token_id: int) -> dict:
    """[left-padded prompt | right-padded response] rows; the response occupies the last R columns.

    prompts[i] is row i's Processor.encode output; response_* are (b, R). A sampled <|image_pad|> id in a response
    is text, not a request for image features (image_mask marks the prompt's image slots only)."""
    b, R = response_ids.shape
    prompt_ids, prompt_mask, pix, grid = left_pad(prompts, pad_id, "cpu")  # (b, P), the sampler's own padding
    input_ids = torch.cat([prompt_ids, torch.where(response_mask.bool(), response_ids,
                                                   torch.full_like(response_ids, pad_id))], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask.long()], dim=1)
    prompt_real = prompt_mask.bool()
    prompt_pos, _ = rope_index(prompt_ids, grid, prompt_real)  # (3, b, P)
    next_pos = prompt_pos.masked_fill(~prompt_real[None], -1).amax(dim=(0, 2)) + 1  # (b,)
    response_pos = (next_pos[:, None] + torch.arange(R))[None].expand(3, b, R)
    image_mask = torch.cat([(prompt_ids == image_token_id) & prompt_real, torch.zeros((b, R), dtype=torch.bool)],
                           dim=1)
    return dict(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                position_ids=torch.cat([prompt_pos, response_pos], dim=2).to(device),
                image_mask=image_mask.to(device), pixel_values=None if pix is None else pix.to(device),
                image_grid_thw=None if grid is None else grid.to(device))


def response_logprobs(model, batch: dict, response_ids: torch.Tensor, temperature: float, entropy_grad=False,
                      mask=None):
    """(log-probs, entropies) (b, R) of the response tokens under `model` (the per-row forward of collate's rows),
    0 where mask (b, R) is 0."""
    R = response_ids.shape[1]
    # the hidden state at column t predicts token t+1: the R response tokens are predicted by the R columns before
    hidden = model(batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                   pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                   image_mask=batch["image_mask"], logits_to_keep=R + 1, return_hidden=True)[:, :-1]
    return head_logprobs(hidden, _whole(_net(model).lm_head.weight), response_ids, temperature, mask,
                         entropy_grad=entropy_grad)


def _whole(weight):
    """The LM head's weight as one tensor: the policy's stays unsharded from its forward to its backward under FSDP2
    (the root keeps its parameters), a sharded reference's is resharded after its forward (no gradient: gather it)."""
    from torch.distributed.tensor import DTensor
    return weight.full_tensor() if isinstance(weight, DTensor) else weight


def _net(model):
    """The model inside a DDP wrapper (.module) and GroupedForward (.net)."""
    model = getattr(model, "module", model)
    return getattr(model, "net", model)


def collate_groups(prompts: list[dict], prompt_index: torch.Tensor, response_ids, response_mask, pad_id: int,
                   device) -> dict:
    """grouped_logits' inputs: the distinct prompts of these rows (left-padded, in first-seen order), their
    images, and each row's prompt number."""
    order = list(dict.fromkeys(int(i) for i in prompt_index))
    local = {p: u for u, p in enumerate(order)}
    ids, real, pix, grid = left_pad([prompts[p] for p in order], pad_id, device)
    return dict(prompt_ids=ids, prompt_mask=real, pixel_values=pix, image_grid_thw=grid,
                response_ids=response_ids.to(device), response_mask=response_mask.to(device),
                row_prompt=torch.tensor([local[int(i)] for i in prompt_index], device=device))


def micro_logprobs(model, prompts, ro, rows: list[int], cfg, device, pad_id: int, entropy_grad: bool = False):
    """(log-probs (b, R), entropies (b, R), response ids, mask) of some rollout rows, trimmed to their longest
    response R, in the order of `rows`. The entropies carry a gradient only with entropy_grad (an entropy bonus).

    model: the model, or its DDP wrapper (around GroupedForward when sharing prefixes). cfg: shared_prefix,
    temperature, dtype (the training forward's autocast)."""
    mask = ro.response_mask[rows]
    R = max(1, int(mask.sum(1).max()))
    resp = ro.response_ids[rows][:, :R].to(device)
    mask = mask[:, :R].to(device)
    head = _net(model).lm_head
    if head.bias is not None:
        raise ValueError("the training forward's chunked log-probs take an LM head without a bias")
    with autocast_ctx(cfg, device):
        if cfg.shared_prefix:
            # the grouped forward takes each prompt's rows together: order them by prompt, then back
            order = sorted(range(len(rows)), key=lambda i: int(ro.prompt_index[rows[i]]))
            back = torch.empty(len(order), dtype=torch.long, device=device)
            back[torch.tensor(order, device=device)] = torch.arange(len(order), device=device)
            batch = collate_groups(prompts, ro.prompt_index[rows][order], resp[order], mask[order], pad_id, device)
            if isinstance(getattr(model, "module", None), GroupedForward):  # DDP around GroupedForward
                hidden, anchor = model(**batch)
            else:
                hidden, anchor = grouped_hidden(model, **batch)
            logp, entropy = head_logprobs(hidden, _whole(head.weight), resp[order], cfg.temperature, mask[order],
                                          entropy_grad=entropy_grad)
            logp, entropy = logp[back] + anchor, entropy[back]
        else:
            net = _net(model)
            batch = collate([prompts[int(ro.prompt_index[r])] for r in rows], resp.cpu(), mask.cpu(), pad_id,
                            device, net.rope_index, net.config.image_token_id)
            logp, entropy = response_logprobs(model, batch, resp, cfg.temperature, entropy_grad, mask)
    return logp, entropy, resp, mask.float()


def micro_batches(rows: list[int], ro, prompts, cfg) -> list[list[int]]:
    """A mini-batch's rows cut into micro-batches (gradient accumulation): micro_batch_size rows each; or with
    micro_batch_tokens (verl's dynamic batch size) rows sorted by response length and packed while the positions the
    forward computes, rows x (longest prompt + longest response), stay within that many tokens (a row longer than
    that goes alone). Each micro-batch's rows in their original order (grouped by prompt)."""
    if not cfg.micro_batch_tokens:
        return [rows[i:i + cfg.micro_batch_size] for i in range(0, len(rows), cfg.micro_batch_size)]
    lengths = ro.response_mask.sum(1).long().tolist()
    out, current, longest = [], [], (0, 0)
    for r in sorted(rows, key=lambda r: (lengths[r], r)):
        size = (prompts[int(ro.prompt_index[r])]["input_ids"].numel(), max(1, lengths[r]))
        grown = (max(longest[0], size[0]), max(longest[1], size[1]))
        if current and (len(current) + 1) * sum(grown) > cfg.micro_batch_tokens:
            out.append(sorted(current))
            current, grown = [], size
        current.append(r)
        longest = grown
    return out + [sorted(current)]


def padded_positions(micro: list[list[int]], ro) -> tuple[float, float]:
    """(response positions the forward computes, those that are real tokens) over these micro-batches: each is
    right-padded to its longest response."""
    lengths = ro.response_mask.sum(1)
    computed = sum(len(mb) * max(1, int(lengths[mb].max())) for mb in micro)
    return float(computed), float(sum(lengths[mb].sum() for mb in micro))


@torch.no_grad()
def all_logprobs(model, prompts, ro, cfg, device, pad_id: int) -> torch.Tensor:
    """Log-probs of every rollout row (B, R) as float32 on the CPU, 0 past each response, micro-batch by
    micro-batch (no gradient): the behaviour policy recomputed, or the reference."""
    out = torch.zeros(ro.response_ids.shape, dtype=torch.float32)
    for rows in micro_batches(list(range(ro.response_ids.shape[0])), ro, prompts, cfg):
        logp, _, _, mask = micro_logprobs(model, prompts, ro, rows, cfg, device, pad_id)
        out[rows, :logp.shape[1]] = (logp.float() * mask).cpu()  # this micro-batch's own width R <= the step's
    return out
