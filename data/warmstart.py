"""Supervised warm start for the toy world: next-token loss on the response tokens of (record, response) pairs.

    losses = warm_start(model, processor, [(record, toy.warmstart_response(record, rng)), ...], steps=300,
                        lr=3e-3, batch_size=32, seed=0)

The prompt is the record's question alone, rendered by the processor's chat template exactly as train.py renders
the toy prompts (step_guided=False): the toy model never needs the long step-guided instruction, and leaving it
out keeps prompts ~30 tokens, which is most of the speed on CPU. The target is the response followed by the stop
token, so the model learns to end its turn. The model is updated in place.
"""
import math

import torch
import torch.nn.functional as F


def encode_example(processor, record, response: str) -> dict:
    """Prompt inputs (Processor.encode of the question + images) plus the target response ids (+ stop token)."""
    enc = processor.encode(record.prompt, record.images)
    ids = processor.tokenizer(response, add_special_tokens=False)["input_ids"] + [processor.stop_token_ids[0]]
    return dict(enc, response_ids=torch.tensor(ids, dtype=torch.long))


def make_batch(examples: list[dict], pad_id: int) -> dict:
    """[left-padded prompt | right-padded response] rows, the layout train.py's collate uses; the response fills
    the last R columns (prompt i ends at column P - 1, its response starts at column P).

    Returns model inputs plus `targets` (b, R) and `target_mask` (b, R), 1 on real response tokens."""
    b = len(examples)
    P = max(e["input_ids"].numel() for e in examples)
    R = max(e["response_ids"].numel() for e in examples)
    input_ids = torch.full((b, P + R), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, P + R), dtype=torch.long)
    targets = torch.full((b, R), pad_id, dtype=torch.long)
    for i, e in enumerate(examples):
        n, r = e["input_ids"].numel(), e["response_ids"].numel()
        input_ids[i, P - n:P] = e["input_ids"]
        input_ids[i, P:P + r] = e["response_ids"]
        attention_mask[i, P - n:P + r] = 1
        targets[i, :r] = e["response_ids"]
    pix = [e["pixel_values"] for e in examples if e.get("pixel_values") is not None]
    grid = [e["image_grid_thw"] for e in examples if e.get("image_grid_thw") is not None]
    return dict(input_ids=input_ids, attention_mask=attention_mask,
                pixel_values=torch.cat(pix) if pix else None, image_grid_thw=torch.cat(grid) if grid else None,
                targets=targets, target_mask=attention_mask[:, P:].clone())


def response_loss(model, batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy over the real response tokens of a batch from make_batch."""
    R = batch["targets"].shape[1]
    # logits at column t predict token t+1: the R response tokens are predicted by the R columns before them
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
                   image_grid_thw=batch["image_grid_thw"], logits_to_keep=R + 1)[:, :-1]      # (b, R, V)
    nll = F.cross_entropy(logits.float().transpose(1, 2), batch["targets"], reduction="none")  # (b, R)
    mask = batch["target_mask"].float()
    return (nll * mask).sum() / mask.sum()


def warm_start(model, processor, examples, steps: int, lr: float, batch_size: int, seed: int = 0, log=print,
               log_every: int = 25, warmup: int = 10, weight_decay: float = 0.0) -> list[float]:
    """`steps` AdamW updates on random mini-batches of `examples` (list of (Record, response text)).

    Linear warmup over `warmup` steps then cosine decay to 10% of `lr`, grad-norm clip 1.0. Each prompt is
    encoded once up front. Returns the loss of every step."""
    if not examples:
        raise ValueError("warm_start: no examples")
    device = next(model.parameters()).device
    encoded = [encode_example(processor, rec, resp) for rec, resp in examples]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    g = torch.Generator().manual_seed(seed)
    order, pos, losses = torch.randperm(len(encoded), generator=g), 0, []
    model.train()
    for step in range(steps):
        if pos + batch_size > len(order):      # a fresh permutation per epoch; the tail of the last one is dropped
            order, pos = torch.randperm(len(encoded), generator=g), 0
        idx = order[pos:pos + batch_size].tolist()
        pos += batch_size
        batch = {k: (v.to(device) if torch.is_tensor(v) else v)
                 for k, v in make_batch([encoded[i] for i in idx], processor.pad_token_id).items()}
        loss = response_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log and (step % log_every == 0 or step == steps - 1):
            log(f"warm start {step + 1}/{steps}: loss {losses[-1]:.4f} lr {sched.get_last_lr()[0]:.2e}")
    model.eval()
    return losses


def prepare_toy_model(cfg, rank: int, device) -> str:
    """The toy run's initial model: build the toy checkpoint and run the supervised warm start once (rank 0; a
    rerun finds it on disk). Returns the warm-started model directory, a complete Hugging Face model."""
    import os
    import random
    import time

    import model as vlm
    from data import toy
    from runtime.parallel import barrier
    init_dir, ws_dir = os.path.join(cfg.out_dir, "toy_init"), os.path.join(cfg.out_dir, "warmstart")
    if rank == 0 and not os.path.isfile(os.path.join(ws_dir, "config.json")):
        if not os.path.isfile(os.path.join(init_dir, "config.json")):
            toy.build_checkpoint(init_dir, seed=cfg.seed)
        net, processor = vlm.load(init_dir, device=device, dtype=torch.float32), vlm.load_processor(init_dir)
        rng = random.Random(cfg.seed)
        examples = [(r, toy.warmstart_response(r, rng, p_couple=cfg.toy_couple,
                                               p_visual_risky=cfg.toy_risky_visual))
                    for r in toy.records(cfg.train_split, cfg.toy_train_size, cfg.seed, toy.mix(cfg.toy_mix))]
        t0 = time.time()
        warm_start(net, processor, examples, steps=cfg.warmstart_steps, lr=cfg.warmstart_lr,
                   batch_size=cfg.warmstart_batch_size, seed=cfg.seed)
        print(f"warm start: {cfg.warmstart_steps} steps in {time.time() - t0:.0f}s", flush=True)
        tmp = ws_dir + ".tmp"
        vlm.save(net, tmp)
        processor.save(tmp)
        os.replace(tmp, ws_dir)
    barrier()
    return ws_dir

