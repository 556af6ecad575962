"""The training forward: log-probs of rollout tokens under a model (the policy being trained, or the frozen
reference), a few rows at a time.

With shared_prefix (the default) the rows' distinct prompts run once and their G rows attend to them
(model/prefix.py); otherwise every row is [its prompt | its response] with the prompt recomputed G times (collate).
Positions and image slots come from the prompt alone, and response positions continue as text, exactly as the
rollout engine decoded them, so the sampler's log-probs and these agree (tests/test_engine.py).
"""
import torch

from model.processor import left_pad
from model.prefix import GroupedForward, grouped_logits
from runtime.parallel import autocast_ctx
from tokenprobs import token_logprobs


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


def response_logprobs(model, batch: dict, response_ids: torch.Tensor, temperature: float):
    """Log-probs of the response tokens under `model` (b, R), and the logits they came from."""
    R = response_ids.shape[1]
    # logits at column t predict token t+1: the R response tokens are predicted by the R columns before them
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                   pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                   image_mask=batch["image_mask"], logits_to_keep=R + 1)[:, :-1]
    return token_logprobs(logits, response_ids, temperature=temperature), logits


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


def micro_logprobs(model, prompts, ro, rows: list[int], cfg, device, pad_id: int):
    """(log-probs (b, R), logits, response ids, mask) of some rollout rows, trimmed to their longest response R.

    model: the model, or its DDP wrapper (around GroupedForward when sharing prefixes). cfg: shared_prefix,
    temperature, dtype (the training forward's autocast)."""
    mask = ro.response_mask[rows]
    R = max(1, int(mask.sum(1).max()))
    resp = ro.response_ids[rows][:, :R].to(device)
    mask = mask[:, :R].to(device)
    with autocast_ctx(cfg, device):
        if cfg.shared_prefix:
            batch = collate_groups(prompts, ro.prompt_index[rows], resp, mask, pad_id, device)
            if isinstance(getattr(model, "module", None), GroupedForward):  # DDP around GroupedForward
                logits, anchor = model(**batch)
            else:
                logits, anchor = grouped_logits(model, **batch)
            logp = token_logprobs(logits, resp, temperature=cfg.temperature) + anchor
        else:
            net = getattr(model, "module", model)  # DDP keeps the model in .module
            batch = collate([prompts[int(ro.prompt_index[r])] for r in rows], resp.cpu(), mask.cpu(), pad_id,
                            device, net.rope_index, net.config.image_token_id)
            logp, logits = response_logprobs(model, batch, resp, cfg.temperature)
    return logp, logits, resp, mask.float()


@torch.no_grad()
def all_logprobs(model, prompts, ro, cfg, device, pad_id: int) -> torch.Tensor:
    """Log-probs of every rollout row (B, R) as float32 on the CPU, 0 past each response, micro-batch by
    micro-batch (no gradient): the behaviour policy recomputed, or the reference."""
    out = torch.zeros(ro.response_ids.shape, dtype=torch.float32)
    B = ro.response_ids.shape[0]
    for start in range(0, B, cfg.micro_batch_size):
        rows = list(range(start, min(start + cfg.micro_batch_size, B)))
        logp, _, _, mask = micro_logprobs(model, prompts, ro, rows, cfg, device, pad_id)
        out[rows, :logp.shape[1]] = (logp.float() * mask).cpu()  # this micro-batch's own width R <= the step's
    return out
