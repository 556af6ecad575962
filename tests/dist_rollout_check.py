"""Run by tests/test_rollout_weights.py under torchrun: rollouts of a tiny model sharded by FSDP2 (gloo, fp32).

    python -m torch.distributed.run --nproc_per_node=N tests/dist_rollout_check.py OUT_DIR
Every rank shards the same seeded model as runtime.parallel.build_policy does (each decoder block, then the root) and
generates the same 4 prompts through a kept Engine, which decodes from its whole copy of the weights; then one
optimizer step on the sharded parameters, and the prompts again. Rank 0 checks what only a process holding shards
can see (the copy holds no DTensor and keeps its addresses across the update; the step on it compiles as one graph)
and writes the rollouts for the test to compare with one process, unsharded."""
import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import STOP, build_tiny, make_prompts  # noqa: E402
from oracle import check_step_compiles  # noqa: E402
from rollout.engine import Engine  # noqa: E402


def update(net, proc):
    """One AdamW step on a loss through the (sharded) model, as the trainer's update would change the weights."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    net.train()
    net(proc.encode("Is it safe?")["input_ids"][None]).float().logsumexp(-1).mean().backward()
    opt.step()
    net.eval()


def main(out_dir: str, shard: bool):
    torch.set_num_threads(1)
    net, proc = build_tiny("qwen3_vl")
    prompts = make_prompts(proc)
    if shard:
        from torch.distributed.fsdp import fully_shard
        dist.init_process_group("gloo")
        for block in net.decoder_blocks():
            fully_shard(block)
        fully_shard(net)
    rank = dist.get_rank() if shard else 0
    kw = dict(group_size=3, max_new_tokens=10, temperature=1.0, stop_token_ids=STOP, seed=4)
    engine = Engine(net)
    first = engine.generate(prompts, **kw)
    weights = engine.state.weights
    pointers = [p.data_ptr() for p in weights.module.parameters()]
    update(net, proc)
    second = engine.generate(prompts, **kw)
    facts = {}
    if shard:
        from torch.distributed.tensor import DTensor
        facts = {"sharded_live": weights.sharded,
                 "copy_has_dtensor": any(isinstance(p, DTensor) for p in weights.module.parameters()),
                 "copy_kept_addresses": pointers == [p.data_ptr() for p in weights.module.parameters()],
                 "built_once": engine.builds == 1}
        fresh = Engine(net).generate(prompts, **kw)  # a new engine's copy of the updated weights
        facts["kept_equals_fresh"] = torch.equal(fresh.response_ids, second.response_ids) and \
            torch.equal(fresh.logprobs, second.logprobs)
        st, shape = Engine(net, buckets=True).ready(prompts, group_size=3, max_new_tokens=12, steps=2,
                                                    stop_token_ids=STOP)
        check_step_compiles(st, shape)  # raises on a graph break
        facts["compiles"] = True
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        save_file({f"{name}_{k}": getattr(ro, k).contiguous() for name, ro in (("first", first), ("second", second))
                   for k in ("response_ids", "response_mask", "logprobs")}, os.path.join(out_dir, "rollouts.safetensors"))
        with open(os.path.join(out_dir, "facts.json"), "w") as f:
            json.dump(facts, f)
    if shard:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], shard=os.environ.get("WORLD_SIZE") is not None)
