"""Run by tests/test_train.py under torchrun: one GRPO update's gradient on a fixed global batch.

    python -m torch.distributed.run --nproc_per_node=N tests/dist_grad_check.py OUT_DIR FSDP
Every rank samples its share of the same 4 prompts (samples depend only on each prompt's seed), then runs
train.train_on_rollouts with an optimizer that records the summed gradient instead of stepping. Rank 0
writes grads.safetensors and stats.json for the test to compare across process counts."""
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model  # noqa: E402
import rewards  # noqa: E402
import train  # noqa: E402
from config import parse_config  # noqa: E402
from data import toy  # noqa: E402


class GradRecorder:
    """Stands in for AdamW: remembers the (full) gradient at step() instead of updating."""

    def __init__(self, params):
        self.params = list(params)
        self.grads = None

    def step(self):
        self.grads = [p.grad.detach().clone() for p in self.params]

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def main(out_dir: str, fsdp: bool):
    torch.set_num_threads(1)
    cfg = parse_config([f"--out_dir={out_dir}", "--prompts_per_step=4", "--mini_batch_prompts=4", "--group_size=3",
                        "--micro_batch_size=2", "--max_new_tokens=10", "--kl_coef=0.05", "--grad_clip=1e9",
                        f"--fsdp={fsdp}"])
    rank, world, device = train.init_distributed(cfg)
    ckpt = os.path.join(out_dir, "init")
    policy_dir = os.path.join(out_dir, "policy")
    if rank == 0:
        toy.build_checkpoint(ckpt, seed=0)
        net = model.load(ckpt)
        with torch.no_grad():  # the policy differs from the reference, so KL and ratios are not trivial
            for p in net.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        model.save(net, policy_dir)
    train.barrier()
    processor = model.load_processor(ckpt)
    wrapped, net = train.build_policy(policy_dir, cfg, device, world)
    ref = train.build_reference(ckpt, cfg, device)
    records = toy.records("train", 4, seed=0)
    ids = list(range(4))[rank::world]
    prompts = train.encode_records(processor, [records[i] for i in ids], cfg)
    reward_fn = rewards.resolve_reward("paper")
    with train.RolloutPolicy(wrapped, net, cfg.fsdp and dist.is_initialized()):
        ro, _, rew, _ = train.rollout(train.Engine(net), processor, prompts, [records[i].labels for i in ids], cfg, 0, ids,
                                      reward_fn, device)
    rew = rew + torch.arange(len(rew)) * 0.1  # distinct rewards: every group has non-zero advantages
    adv = train.grpo.group_advantages(rew, cfg.group_size)
    opt = GradRecorder(wrapped.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), lambda s: 1.0)
    stats = train.train_on_rollouts(wrapped, ref, opt, sched, prompts, ro, adv, cfg, device, world,
                                    processor.pad_token_id)
    names = [n for n, _ in net.named_parameters()]
    grads = {n: (g.full_tensor() if hasattr(g, "full_tensor") else g).cpu().contiguous() for n, g in zip(names, opt.grads)}
    if rank == 0:
        from safetensors.torch import save_file
        save_file(grads, os.path.join(out_dir, "grads.safetensors"))
        json.dump({k: float(v) for k, v in stats.items()}, open(os.path.join(out_dir, "stats.json"), "w"))
    train.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "True")
