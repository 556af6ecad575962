"""Per-token fp32 log-probs and entropies of softmax(logits / temperature), chunked over (batch, time), so the full
(B, T, V) fp32 softmax of a long response never exists at once (the vocabulary is ~150k for Qwen-VL). Used by the
training forward (logprobs.py) and the loss (grpo.py); the rollout's sampler computes the same log-prob (rollout.sampling.sample).
"""
import torch


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
