"""The training forward with each prompt computed once per group: GRPO's G responses share one prompt (and its
image), so the prompt pass runs on the distinct prompts only and the G response rows attend to its keys/values.

Two passes through the model's cache interface (kv_cache.py), with autograd kept:
  1. prompt pass: the U distinct prompts without their last token (left-padded, images encoded once each);
     PrefixRecorder attends causally and keeps every layer's rotated keys/values;
  2. row pass: each of the B rows runs [its prompt's last token | its response but the last token] (R tokens);
     SharedPrefix lets row b attend to [its prompt's keys/values | its own tokens, causal]. Its R logits predict
     the R response tokens directly, one lm_head call (no (B, R, V) concatenation, no second logits copy).
Gradients from the G rows flow back into the one prompt pass and add up, which is what G copies of the prompt
would have received. Equal to the per-row forward up to float rounding (tests/test_prefix.py): positions come
from rope_index on the whole prompt (responses continue after its largest M-RoPE position, as in logprobs.collate),
same masks, same image features. The prompt's last token (text: the chat template's assistant header) is
computed G times instead of once, which is nothing next to the prompt.
"""
import torch
from torch import nn

from .decoder import KeyMask, attention, causal_mask


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
        # keep the first pass's tensors: activation checkpointing re-runs a block in backward, and the recomputed
        # k/v (equal values, a graph of their own) need not be kept alive
        if self.k[layer_idx] is None:
            self.k[layer_idx], self.v[layer_idx] = k, v
        return attention(q, k, v, self._mask, self.attn_impl)


class SharedPrefix:
    """Cache stand-in for the row pass: row b sees its prompt's real tokens, then its own tokens causally (right
    padding masked). The prompt's keys/values reach the rows by expand when there is one prompt, else by index."""

    def __init__(self, prefix: PrefixRecorder, row_prompt: torch.Tensor, row_mask: torch.Tensor,
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


def grouped_logits(net, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, pixel_values, image_grid_thw,
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
    prefix = PrefixRecorder(net.config.text.num_hidden_layers, U, prompt_ids.device, net.config.text.attn_impl)
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
    cache = SharedPrefix(prefix, row_prompt, real, net.config.text.attn_impl)
    return net(ids, attention_mask=real, position_ids=pos, cache=cache), anchor


class GroupedForward(nn.Module):
    """`grouped_logits` as one module call, so DDP sees one forward per backward (its reducer is prepared once,
    although every parameter is used by both passes)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, **batch):
        return grouped_logits(self.net, **batch)
