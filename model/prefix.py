"""The training forward with each prompt computed once per group: GRPO's G responses share one prompt (and its
image), so the prompt pass runs on the distinct prompts only and the G response rows attend to its keys/values.

Two passes through the model's cache interface (kv_cache.py), with autograd kept:
  1. prompt pass: the U distinct prompts without their last token (left-padded, images encoded once each);
     PrefixRecorder attends causally within each prompt's real tokens and keeps every layer's rotated keys/values;
  2. row pass: each of the B rows runs [its prompt's last token | its response but the last token] (R tokens);
     SharedPrefix lets row b attend to [its prompt's real keys/values | its own tokens, causal]. The last hidden
     states predict the R response tokens; logprobs.py turns them into log-probs chunk by chunk through the LM head.
No dense mask and no repeated keys: a prompt's real tokens are a slice (left padding is cut off), and with right-padded
responses a real query sees exactly [the prompt | its own earlier tokens], the lower-right causal pattern
(torch.nn.attention.bias.causal_lower_right), which SDPA computes without materialising it and with grouped keys
(enable_gqa). Rows must come grouped by prompt (collate_groups orders them so), so each prompt's rows are a slice too.
Gradients from the G rows flow back into the one prompt pass and add up, which is what G copies of the prompt would
have received. Equal to the per-row forward up to float rounding (tests/test_prefix.py): positions come from rope_index
on the whole prompt (responses continue after its largest M-RoPE position, as in logprobs.collate), same image
features. The prompt's last token (text: the chat template's assistant header) is computed G times instead of once.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right


class PrefixRecorder:
    """Cache stand-in for the prompt pass: each prompt attends causally within its own real tokens (left padding cut
    off; a padding position's output is 0, read by nobody), keys/values kept for the row pass."""

    def __init__(self, num_layers: int, batch_size: int, device):
        self.k, self.v = [None] * num_layers, [None] * num_layers
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)  # an empty cache
        self.pads = None  # per prompt: left padding positions (host ints)

    def append(self, new_mask: torch.Tensor, next_position: torch.Tensor) -> None:
        self.pads = (new_mask.shape[1] - new_mask.sum(1)).tolist()
        self.next_position = next_position

    def attend(self, layer_idx: int, q, k, v):
        # keep the first pass's tensors: activation checkpointing re-runs a block in backward, and the recomputed
        # k/v (equal values, a graph of their own) need not be kept alive
        if self.k[layer_idx] is None:
            self.k[layer_idx], self.v[layer_idx] = k, v
        gqa = q.shape[1] != k.shape[1]
        if not any(self.pads):  # no padding: one causal call for every prompt
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        out = []
        for u, pad in enumerate(self.pads):
            o = F.scaled_dot_product_attention(q[u:u + 1, :, pad:], k[u:u + 1, :, pad:], v[u:u + 1, :, pad:],
                                               is_causal=True, enable_gqa=gqa)
            out.append(F.pad(o, (0, 0, pad, 0)))
        return torch.cat(out)


class SharedPrefix:
    """Cache stand-in for the row pass: the rows of prompt u (a slice of the batch) see that prompt's real keys, then
    their own tokens causally (lower-right aligned: query i of R sees the n prompt keys and own keys 0..i)."""

    def __init__(self, prefix: PrefixRecorder, row_prompt: torch.Tensor):
        prompts = row_prompt.tolist()
        if prompts != sorted(prompts):
            raise ValueError("SharedPrefix needs the rows grouped by prompt (logprobs.collate_groups orders them)")
        counts = torch.bincount(row_prompt, minlength=len(prefix.pads)).tolist()
        starts = [sum(counts[:u]) for u in range(len(counts))]
        self.groups = [(u, starts[u], starts[u] + c) for u, c in enumerate(counts) if c]  # (prompt, row slice)
        self.prefix = prefix
        self.next_position = torch.zeros(row_prompt.numel(), dtype=torch.long, device=row_prompt.device)

    def append(self, new_mask, next_position) -> None:
        pass  # positions are given explicitly; right padding needs no mask (see the class docstring)

    def attend(self, layer_idx: int, q, k, v):
        pk, pv = self.prefix.k[layer_idx], self.prefix.v[layer_idx]  # (U, Hkv, Tp - 1, D)
        R = q.shape[2]
        # SDPA with an attention-bias object checks dtypes before autocast would unify them (q and k may come out of
        # the q/k norm in fp32, v in bf16): cast to what autocast would
        device = q.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else q.dtype
        q, k, v, pk, pv = (t.to(dtype) for t in (q, k, v, pk, pv))
        out = []
        for u, a, b in self.groups:
            pad, rows = self.prefix.pads[u], b - a
            n = pk.shape[2] - pad
            keys = torch.cat([pk[u:u + 1, :, pad:].expand(rows, -1, -1, -1), k[a:b]], dim=2)  # (rows, Hkv, n + R, D)
            values = torch.cat([pv[u:u + 1, :, pad:].expand(rows, -1, -1, -1), v[a:b]], dim=2)
            out.append(F.scaled_dot_product_attention(q[a:b], keys, values, attn_mask=causal_lower_right(R, n + R),
                                                      enable_gqa=q.shape[1] != k.shape[1]))
        return out[0] if len(out) == 1 else torch.cat(out)


def grouped_hidden(net, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, pixel_values, image_grid_thw,
                   response_ids: torch.Tensor, response_mask: torch.Tensor, row_prompt: torch.Tensor):
    """(last hidden states (B, R, C) that predict each of the B rows' R response tokens through the LM head, anchor):
    add the 0-valued scalar `anchor` to the loss (see below; it changes no value or gradient).

    prompt_ids/prompt_mask (U, Tp): the distinct prompts, left-padded; pixel_values/image_grid_thw: their images
    (or None); response_ids/response_mask (B, R): right-padded responses; row_prompt (B,): each row's prompt, in
    non-decreasing order."""
    U, Tp = prompt_ids.shape
    if Tp < 2 or bool((prompt_ids[:, -1] == net.config.image_token_id).any()):
        raise ValueError("grouped_hidden needs prompts of >= 2 tokens that end in text (the chat template's "
                         "assistant header); use the per-row forward (--shared_prefix=false)")
    grid = image_grid_thw if pixel_values is not None else None
    positions, _ = net.rope_index(prompt_ids, grid, prompt_mask.bool())  # (3, U, Tp), the whole prompt
    prefix = PrefixRecorder(net.config.text.num_hidden_layers, U, prompt_ids.device)
    prompt_out = net(prompt_ids[:, :-1], attention_mask=prompt_mask[:, :-1], position_ids=positions[:, :, :-1],
                     pixel_values=pixel_values, image_grid_thw=image_grid_thw, cache=prefix, logits_to_keep=1,
                     return_hidden=True)
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
    cache = SharedPrefix(prefix, row_prompt)
    return net(ids, attention_mask=real, position_ids=pos, cache=cache, return_hidden=True), anchor


def grouped_logits(net, *args, **batch):
    """grouped_hidden through the LM head: logits (B, R, V) and the anchor (the tests' and benchmarks' form; the
    trainer never makes the logits whole, logprobs.head_logprobs)."""
    h, anchor = grouped_hidden(net, *args, **batch)
    return net.lm_head(h), anchor


class GroupedForward(nn.Module):
    """`grouped_hidden` as one module call, so DDP sees one forward per backward (its reducer is prepared once,
    although every parameter is used by both passes)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, **batch):
        return grouped_hidden(self.net, **batch)
