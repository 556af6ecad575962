"""Probe for the next speed-up of the GRPO step: the training forward with each prompt (and its image) computed
once per group instead of once per sample. Compares train.micro_logprobs (prompt recomputed in all G rows) with a
shared-prefix forward built only on the model's cache interface (kv_cache.py): same log-probs and gradients, and
the time of forward + backward.

    .venv/bin/python bench/prefix_probe.py [--ckpt runs/bench/grpo_step_model] [--threads 1] [--runs 3]
A prototype for bench/README.md's recommendation, not training code.
"""
import argparse
import os
import statistics
import sys
import time

if __name__ == "__main__":  # run as a script, this folder would shadow the top-level modules (rewards.py)
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch
import torch.nn.functional as F


class PrefixRecorder:
    """Cache stand-in for the prompt pass (one row, no padding): plain causal attention, and each layer's keys and
    values kept with their autograd history, for the response pass to attend to."""

    def __init__(self, n_layers: int, device):
        self.k, self.v = [None] * n_layers, [None] * n_layers
        self.next_position = torch.zeros(1, dtype=torch.long, device=device)

    def append(self, new_mask, next_position):
        self.next_position = next_position

    def attend(self, layer_idx, q, k, v):
        self.k[layer_idx], self.v[layer_idx] = k, v
        rep = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                              is_causal=True)


class SharedPrefix:
    """Cache stand-in for the response pass: G rows attend to [the prompt's keys/values, shared | their own,
    causal, right padding masked]. The prompt's k/v enter every row through expand(): autograd sums the G rows'
    gradients into the one prompt pass, which is what G separate prompt copies would have received."""

    def __init__(self, prefix: PrefixRecorder, response_mask: torch.Tensor):
        G, T = response_mask.shape
        Tp = prefix.k[0].shape[2]
        dev = response_mask.device
        own = torch.ones(T, T, dtype=torch.bool, device=dev).tril()[None] & response_mask.bool()[:, None, :]
        own = own | torch.eye(T, dtype=torch.bool, device=dev)[None]  # a padding query sees itself: finite
        self.mask = torch.cat([torch.ones(G, T, Tp, dtype=torch.bool, device=dev), own], dim=-1)[:, None]
        self.prefix = prefix
        self.next_position = prefix.next_position.expand(G)

    def append(self, new_mask, next_position):
        pass

    def attend(self, layer_idx, q, k, v):
        G, rep = q.shape[0], q.shape[1] // k.shape[1]
        K = torch.cat([self.prefix.k[layer_idx].expand(G, -1, -1, -1), k], dim=2)
        V = torch.cat([self.prefix.v[layer_idx].expand(G, -1, -1, -1), v], dim=2)
        return F.scaled_dot_product_attention(q, K.repeat_interleave(rep, 1), V.repeat_interleave(rep, 1),
                                              attn_mask=self.mask)


def shared_prefix_logprobs(model, prompt: dict, response_ids, response_mask, temperature=1.0):
    """Log-probs (G, R) of G responses to one prompt: the prompt (and image) forward once, the responses after it."""
    import grpo
    G, R = response_ids.shape
    prefix = PrefixRecorder(model.config.text.num_hidden_layers, response_ids.device)
    ids = prompt["input_ids"][None]
    first = model(ids, pixel_values=prompt["pixel_values"], image_grid_thw=prompt["image_grid_thw"], cache=prefix,
                  logits_to_keep=1)  # (1, 1, V): predicts response token 0
    T = R - 1  # response tokens 0..R-2 predict tokens 1..R-1
    pos = (prefix.next_position + torch.arange(T, device=ids.device)).view(1, 1, T).expand(3, G, T)
    rest = model(response_ids[:, :T], attention_mask=response_mask[:, :T], position_ids=pos,
                 cache=SharedPrefix(prefix, response_mask[:, :T]))  # (G, T, V)
    logits = torch.cat([first.expand(G, 1, -1), rest], dim=1)
    return grpo.token_logprobs(logits, response_ids, temperature)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                   "runs", "bench", "grpo_step_model"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import model as vlm
    import sample
    import train
    from bench.grpo_step import GROUP_SIZE, NEW_TOKENS, build_checkpoint, make_image, make_prompt
    from config import Config
    build_checkpoint(args.ckpt)
    net = vlm.load(args.ckpt).train()
    processor = vlm.load_processor(args.ckpt)
    image = make_image()
    prompt = processor.encode(make_prompt(processor, image), [image])
    ro = sample.generate(net, [prompt], group_size=GROUP_SIZE, max_new_tokens=NEW_TOKENS, seed=0)
    for name in ("response_ids", "response_mask", "logprobs"):  # out of inference mode, for autograd
        setattr(ro, name, getattr(ro, name).clone())
    cfg = Config(model=args.ckpt, data="bench", prompts_per_step=1, mini_batch_prompts=1,
                 micro_batch_size=GROUP_SIZE, max_new_tokens=NEW_TOKENS, device="cpu", dtype="fp32")
    rows, device = list(range(GROUP_SIZE)), torch.device("cpu")
    mask = ro.response_mask

    def per_row():
        logp = train.micro_logprobs(net, [prompt], ro, rows, cfg, device, processor.pad_token_id)[0]
        return logp

    def shared():
        return shared_prefix_logprobs(net, prompt, ro.response_ids, mask)

    results = {}
    for name, fn in (("per-row prompt (train.micro_logprobs)", per_row), ("shared prefix", shared)):
        times, fwd = [], []
        for _ in range(args.runs + 1):
            net.zero_grad(set_to_none=True)
            t0 = time.process_time()
            logp = fn()
            t1 = time.process_time()
            (-(logp * mask).sum() / mask.sum()).backward()
            times.append(time.process_time() - t0)
            fwd.append(t1 - t0)
        grads = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
        results[name] = (logp.detach(), grads, statistics.median(fwd[1:]), statistics.median(times[1:]))
        print(f"{name:40s} forward {results[name][2]:6.2f} s   forward + backward {results[name][3]:6.2f} s CPU",
              flush=True)
    (a, ga, _, ta), (b, gb, _, tb) = results.values()
    print(f"max |log-prob difference| {float((a - b).abs().max()):.2e}; gradient relative difference "
          f"{float((ga - gb).norm() / ga.norm()):.2e}; speed-up of forward + backward x{ta / tb:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
