"""One sampling step on the device: logits -> tokens by inverse-CDF sampling from a given uniform number per row, and
each chosen token's log-prob. Temperature, top-k and top-p (nucleus) filtering; temperature 0 is greedy.
"""
import torch


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
    forward (logprobs.token_logprobs), so the PPO ratio starts at exactly 1. temperature 0 = argmax, raw logits."""
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
