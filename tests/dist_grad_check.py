"""Run by tests/test_train.py under torchrun: one GRPO step's gradient on a fixed global batch.

    python -m torch.distributed.run --nproc_per_node=N tests/dist_grad_check.py OUT_DIR FSDP [--option=value ...]
Every rank samples its share of the step's 4 prompts (samples depend only on each prompt's seed; with
--dynamic_sampling=true the informative groups are chosen over all ranks), then runs train.grpo_update with an
optimizer that records the summed gradient instead of stepping. Rank 0 writes grads.safetensors and stats.json for
the test to compare across process counts."""
import json
import os
import sys

import torch

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


def main(out_dir: str, fsdp: bool, extra: list[str]):
    torch.set_num_threads(1)
    cfg = parse_config([f"--out_dir={out_dir}", "--prompts_per_step=4", "--mini_batch_prompts=4", "--group_size=3",
                        "--micro_batch_size=2", "--max_new_tokens=10", "--kl_coef=0.05", "--grad_clip=1e9",
                        "--dynamic_sampling=false", f"--fsdp={fsdp}", *extra])
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
    ref = train.build_reference(ckpt, cfg, device, net)
    records = toy.records("train", 12, seed=0)
    reward_fn = rewards.resolve_reward("paper")
    # Rewards that differ by response length: without dynamic sampling every group has non-zero advantages; with
    # it only the length's parity counts, so some groups are informative and some are not, and the choice matters.
    unit = (lambda n: n * 1e-3) if not cfg.dynamic_sampling else (lambda n: (n % 2) * 1e-3)
    reward_fn = (lambda score: lambda text, labels: (lambda r, c: (r + unit(len(text)), c))(*score(text, labels)))(
        reward_fn)
    batch, _, draws = train.collect_step(train.Engine(net), processor, records, cfg, 0, 0, reward_fn, device, rank,
                                         world)
    opt = GradRecorder(p for p in wrapped.parameters() if p.requires_grad)  # LoRA: the adapters alone
    sched = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), lambda s: 1.0)
    stats = train.grpo_update(wrapped, ref, opt, sched, train.grpo.FixedKLController(cfg.kl_coef), batch, cfg, device,
                              rank, world, processor.pad_token_id)
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    grads = {n: (g.full_tensor() if hasattr(g, "full_tensor") else g).cpu().contiguous() for n, g in zip(names, opt.grads)}
    if rank == 0:
        from safetensors.torch import save_file
        save_file(grads, os.path.join(out_dir, "grads.safetensors"))
        with open(os.path.join(out_dir, "stats.json"), "w") as f:
            json.dump({**{k: float(v) for k, v in stats.items()}, "draws": draws}, f)
    train.barrier()
    # Leave without destroying the gloo process group: its destructor joins gloo's worker thread while holding the
    # GIL, and that thread can be waiting for the GIL (seen as a rank hung at exit after writing its results, twice
    # in CI's 2-process tests). Everything this process writes is closed above.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "True", sys.argv[3:])
