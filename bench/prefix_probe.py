"""The training forward with each prompt (and its image) computed once per group (`--shared_prefix`, the default,
model/prefix.py) vs once per sample: logprobs.micro_logprobs both ways on grpo_step.py's model and setting; same
log-probs and gradients, and the CPU time of forward + backward.

    .venv/bin/python bench/prefix_probe.py [--ckpt runs/bench/grpo_step_model] [--threads 2] [--runs 3]
"""
import argparse
import os
import statistics
import sys
import time

if __name__ == "__main__":  # run as a script, this folder would shadow the top-level modules (rewards.py)
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                   "runs", "bench", "grpo_step_model"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import model as vlm
    import sample
    import logprobs
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
    rows, device = list(range(GROUP_SIZE)), torch.device("cpu")
    mask = ro.response_mask

    def forward(shared: bool):
        cfg = Config(model=args.ckpt, data="bench", prompts_per_step=1, mini_batch_prompts=1, shared_prefix=shared,
                     micro_batch_size=GROUP_SIZE, max_new_tokens=NEW_TOKENS, device="cpu", dtype="fp32")
        return lambda: logprobs.micro_logprobs(net, [prompt], ro, rows, cfg, device, processor.pad_token_id)[0]

    results = {}
    for name, fn in (("prompt in every row (--shared_prefix=false)", forward(False)),
                     ("prompt once per group (default)", forward(True))):
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
