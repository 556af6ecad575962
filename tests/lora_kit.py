"""Shared pieces of the LoRA tests (test_lora*.py): adapters set as after some training, a prompt with two images,
rows of responses, their log-probs through both training forwards, one optimizer step, a state snapshot."""
import torch

from conftest import make_prompts
from logprobs import token_logprobs
from model.lora import is_lora_key
from model.prefix import grouped_logits
from model.processor import left_pad

ARCHS = ("qwen3_vl", "qwen2_5_vl")


def randomize_adapters(net, seed=0, scale=0.05):
    """Adapters as after some training: B != 0 too, so every path through them shows in the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if is_lora_key(name):
                p.copy_(scale * torch.randn(p.shape, generator=gen))
    return net


def image_prompt(proc):
    return make_prompts(proc)[2]  # two images, so both towers run more than one segment


@torch.no_grad()
def logits_of(net, p):
    return net(p["input_ids"][None], pixel_values=p["pixel_values"], image_grid_thw=p["image_grid_thw"])


def responses(n_rows=6, R=7, vocab=300, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(50, vocab, (n_rows, R), generator=gen)
    mask = torch.ones(n_rows, R)
    mask[1, 4:] = 0  # rows of different lengths
    mask[4, 2:] = 0
    return ids, mask


def training_logprobs(net, prompts, ids, mask, shared: bool):
    """Response log-probs (B, R) of rows 2 per prompt: the shared-prefix forward, or one row per [prompt | response]."""
    prompt_index = torch.arange(len(prompts)).repeat_interleave(ids.shape[0] // len(prompts))
    if shared:
        prompt_ids, prompt_mask, pixels, grid = left_pad(prompts, 0, "cpu")
        logits, _ = grouped_logits(net, prompt_ids, prompt_mask, pixels, grid, ids, mask, prompt_index)
        return token_logprobs(logits, ids) * mask
    out = []
    for r, i in enumerate(prompt_index.tolist()):
        n = int(mask[r].sum())
        full = torch.cat([prompts[i]["input_ids"], ids[r, :n]])[None]
        logits = net(full, pixel_values=prompts[i].get("pixel_values"), image_grid_thw=prompts[i].get("image_grid_thw"))
        lp = token_logprobs(logits[:, -n - 1:-1], ids[r:r + 1, :n])[0]
        out.append(torch.cat([lp, lp.new_zeros(ids.shape[1] - n)]))
    return torch.stack(out)


def one_step(net, proc, optimizer, seed=0):
    """One AdamW update on a loss through both forwards (shared-prefix and plain, images included)."""
    prompts = make_prompts(proc)[:3]
    ids, mask = responses(seed=seed)
    net.train()
    loss = -(training_logprobs(net, prompts, ids, mask, shared=True).sum()
             + training_logprobs(net, prompts[:1], ids[:2], mask[:2], shared=False).sum())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    net.eval()


def snapshot(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}
