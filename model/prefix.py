"""The training forward with each prompt computed once per group: GRPO's G responses share one prompt (and its
image), so the prompt pass runs on the distinct prompts only and the G response rows attend to its keys/values.

Two passes through the model's cache interface (kv_cache.py), with autograd kept:
  1. prompt pass: the U distinct prompts (left-padded, images encoded once each); PrefixRecorder attends causally
     and keeps every layer's rotated keys/values;
  2. response pass: the B rows' response tokens; SharedPrefix lets row b attend to [its prompt's keys/values |
     its own response, causal]. Gradients from the G rows flow back into the one prompt pass and add up, which
     is what G copies of the prompt would have received.
Equal to the per-row forward up to float rounding (tests/test_prefix.py): same positions (responses continue
after the prompt's largest M-RoPE position), same masks, same image features.
"""
import torch
from torch import nn

from .decoder import attention, causal_mask


class PrefixRecorder:
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
        self.k[layer_idx], self.v[layer_idx] = k, v
        return attention(q, k, v, self._mask, self.attn_impl)


class SharedPrefix:
    """Cache stand-in for the response pass: row b sees its prompt's real tokens, then its own response causally
    (right padding masked). The prompt's keys/values reach the rows by index (by expand when there is one)."""

    def __init__(self, prefix: PrefixRecorder, row_prompt: torch.Tensor, response_mask: torch.Tensor,
                 attn_impl: str = "sdpa"):
        B, T = response_mask.shape
        dev = response_mask.device
        self.prefix, self.attn_impl = prefix, attn_impl
        self.single = bool((row_prompt == row_prompt[0]).all())
        self.row_prompt = row_prompt
        own = torch.ones(T, T, dtype=torch.bool, device=dev).tril()[None] & response_mask.bool()[:, None, :]
        own = own | torch.eye(T, dtype=torch.bool, device=dev)[None]  # a padding query sees itself: finite
        pre = prefix.valid[row_prompt][:, None, :].expand(B, T, -1)
        self._mask = torch.cat([pre, own], dim=-1)[:, None]  # (B, 1, T, Tp + T)
        self.next_position = prefix.next_position[row_prompt]

    def append(self, new_mask, next_position) -> None:
        pass  # positions are given explicitly; the mask was built from the response mask

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        B = self.row_prompt.numel()
        return x[:1].expand(B, -1, -1, -1) if self.single else x[self.row_prompt]

    def attend(self, layer_idx: int, q, k, v):
        K = torch.cat([self._rows(self.prefix.k[layer_idx]), k], dim=2)
        V = torch.cat([self._rows(self.prefix.v[layer_idx]), v], dim=2)
        return attention(q, K, V, self._mask, self.attn_impl)


def grouped_logits(net, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, pixel_values, image_grid_thw,
                   response_ids: torch.Tensor, response_mask: torch.Tensor, row_prompt: torch.Tensor) -> torch.Tensor:
    """Logits (B, R, V) predicting each of the B rows' R response tokens.

    prompt_ids/prompt_mask (U, Tp): the distinct prompts, left-padded; pixel_values/image_grid_thw: their images
    (or None); response_ids/response_mask (B, R): right-padded responses; row_prompt (B,): each row's prompt."""
    prefix = PrefixRecorder(net.config.text.num_hidden_layers, prompt_ids.shape[0], prompt_ids.device,
                            net.config.text.attn_impl)
    # the prompt's last column is a real token (left padding): its logits predict response token 0
    first = net(prompt_ids, attention_mask=prompt_mask, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                cache=prefix, logits_to_keep=1)  # (U, 1, V)
    first = first[:1].expand(len(row_prompt), -1, -1) if bool((row_prompt == row_prompt[0]).all()) \
        else first[row_prompt]
    B, R = response_ids.shape
    if R == 1:
        return first
    T = R - 1  # response tokens 0..R-2 predict tokens 1..R-1
    cache = SharedPrefix(prefix, row_prompt, response_mask[:, :T], net.config.text.attn_impl)
    pos = (cache.next_position[:, None] + torch.arange(T, device=response_ids.device))[None].expand(3, B, T)
    rest = net(response_ids[:, :T], attention_mask=response_mask[:, :T], position_ids=pos, cache=cache)
    return torch.cat([first, rest], dim=1)


class GroupedForward(nn.Module):
    """`grouped_logits` as one module call, so DDP sees one forward per backward (its reducer is prepared once,
    although every parameter is used by both passes)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, **batch) -> torch.Tensor:
        return grouped_logits(self.net, **batch)
