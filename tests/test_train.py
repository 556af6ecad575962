"""train.py end to end at CI size: finite metrics, exact resume, 1 vs 2 processes, crash-safe checkpoints,
non-finite updates skipped, and the real-checkpoint path (a tiny HF-format model + a SafeTag JSONL)."""
import json
import os
import subprocess
import warnings
import sys

import pytest
import torch

import config
import grpo
import train
from runtime import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A few-step toy run: tiny batches, short responses, a handful of warm-start updates.
TINY = ["--max_steps=3", "--toy_train_size=24", "--toy_eval_size=6", "--warmstart_steps=3",
        "--prompts_per_step=4", "--mini_batch_prompts=2", "--group_size=3", "--micro_batch_size=4",
        "--max_new_tokens=12", "--save_every=1", "--keep_last=5", "--eval_batch_size=8", "--threads=1"]
TIMING = ("tokens_per_s", "rollout_time", "step_time")


def read_metrics(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    nan_free = lambda v: None if v != v else v    # noqa: E731  (NaN != NaN would fail every comparison)
    return [{k: nan_free(v) for k, v in r.items() if k not in TIMING} for r in rows if "reward" in r]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("toy_run"))
    summary = train.main(TINY + [f"--out_dir={out}"])
    return out, summary


def test_few_step_run_has_finite_metrics_and_outputs(toy_run):
    out, summary = toy_run
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for k in ("reward", "format", "kl", "entropy", "grad_norm", "response_len", "pg_loss"):
            assert k in r and r[k] == r[k] and abs(r[k]) < 1e6, (k, r)
        assert 0.0 <= r["reward"] <= 1.0
        for k in ("refusal_unsafe", "over_refusal_safe"):  # None (NaN) only when the step had no such row
            assert r[k] is None or 0.0 <= r[k] <= 1.0, (k, r)
    for block in ("before", "after", "after_image_blank"):
        assert set(summary[block]) >= {"reward", "format_rate", "combined_acc", "refusal_unsafe",
                                       "over_refusal_safe", "compositional_refusal"}
    assert json.load(open(os.path.join(out, "summary.json"))) == json.loads(json.dumps(summary))
    assert os.path.isfile(os.path.join(out, "curves.png"))
    ckpts = checkpoints.list_checkpoints(out)
    assert [os.path.basename(c) for c in ckpts] == ["step_000001", "step_000002", "step_000003"]
    saved = json.load(open(os.path.join(ckpts[-1], "trainer_state.json")))
    assert saved["step"] == 3 and saved["config"]["max_steps"] == 3


class Interrupted(Exception):
    pass


def test_resume_reproduces_the_uninterrupted_run(toy_run, tmp_path, monkeypatch):
    out_full, _ = toy_run
    out = str(tmp_path / "resumed")
    real_save = checkpoints.save_checkpoint

    def save_then_die(out_dir, step, *args, **kw):  # the run is interrupted right after checkpoint 1
        path = real_save(out_dir, step, *args, **kw)
        if step == 1:
            raise Interrupted
        return path

    monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_die)
    with pytest.raises(Interrupted):
        train.main(TINY + [f"--out_dir={out}"])
    monkeypatch.setattr(checkpoints, "save_checkpoint", real_save)
    # the second invocation resumes from step 1 and runs steps 2 and 3 with the same schedule
    train.main(TINY + [f"--out_dir={out}", "--resume=true"])
    assert read_metrics(out) == read_metrics(out_full)


def test_config_rejects_unknown_and_bad_values():
    with pytest.raises(ValueError, match="unknown option --lerning_rate"):
        config.parse_config(["--lerning_rate=1"])
    with pytest.raises(ValueError, match="--group_size='x'"):
        config.parse_config(["--group_size=x"])
    with pytest.raises(ValueError, match="loss_agg"):
        config.parse_config(["--loss_agg=mean"])
    cfg = config.parse_config(["--model=/ckpt", "--kl_coef=0"])
    assert cfg.lr == 1e-6 and cfg.group_size == 8 and cfg.prompts_per_step == 256  # the paper's values
    toy = config.parse_config(["--lr=0.5"])
    assert toy.lr == 0.5 and toy.prompts_per_step == config.TOY_PRESET["prompts_per_step"]


def test_cli_exits_nonzero_with_a_clear_message():
    r = subprocess.run([sys.executable, "train.py", "--no_such_flag=1"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "unknown option --no_such_flag" in r.stderr


def test_nonfinite_update_is_skipped_and_reported(tmp_path, monkeypatch, capsys):
    real = grpo.policy_loss
    calls = {"n": 0}

    def poisoned(*args, **kw):  # call 3 = step 1, 2nd mini-batch, 1st micro-batch: a NaN loss
        loss, stats = real(*args, **kw)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 3 else loss), stats

    monkeypatch.setattr(grpo, "policy_loss", poisoned)
    out = str(tmp_path / "nan")
    # a step is 2 mini-batches of 2 prompts x 3 samples = 6 rows; micro-batches of 4 -> 4 calls per step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train.main(TINY + [f"--out_dir={out}", "--max_steps=2"])
    rows = read_metrics(out)
    assert [r["skipped_updates"] for r in rows] == [1, 0] and [r["updates"] for r in rows] == [1, 2]
    # the LR schedule counts the updates that happened: no scheduler step without an optimizer step
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    assert "skipped 1 update(s) with non-finite gradients" in capsys.readouterr().out
    policy = checkpoints.latest_checkpoint(out)
    import model
    net = model.load(os.path.join(policy, "policy"))
    assert all(torch.isfinite(p).all() for p in net.parameters())
    # over the limit, the run stops with an error naming the last good checkpoint
    calls["n"] = -10**9
    monkeypatch.setattr(grpo, "policy_loss", lambda *a, **k: (lambda l, s: (l * float("nan"), s))(*real(*a, **k)))
    with pytest.raises(RuntimeError, match="non-finite updates exceed --max_nonfinite=1"):
        train.main(TINY + [f"--out_dir={str(tmp_path / 'nan2')}", "--max_nonfinite=1"])


KILL_SCRIPT = r"""
import os, signal, sys
sys.path.insert(0, {root!r})
sys.path.insert(0, os.path.join({root!r}, "tests"))
import torch, model
from runtime import checkpoints
from tiny import tiny_qwen3vl_config
net = model.Qwen3VL(tiny_qwen3vl_config()).init_weights(seed=0)
opt = torch.optim.AdamW(net.parameters())
state = {{"step": 1, "nonfinite": 0}}
checkpoints.save_checkpoint({out!r}, 1, lambda p: model.save(net, p), opt.state_dict(), state, keep_last=3)
def dying_save(path):
    model.save(net, path)
    os.kill(os.getpid(), signal.SIGKILL)   # killed after the policy, before optimizer/state are written
checkpoints.save_checkpoint({out!r}, 2, dying_save, opt.state_dict(), dict(state, step=2), keep_last=3)
"""


def test_killed_during_checkpoint_write_leaves_previous_loadable(tmp_path):
    out = str(tmp_path / "run")
    r = subprocess.run([sys.executable, "-c", KILL_SCRIPT.format(root=ROOT, out=out)], capture_output=True, text=True)
    assert r.returncode == -9, r.stderr
    latest = checkpoints.latest_checkpoint(out)
    assert os.path.basename(latest) == "step_000001"
    ck = checkpoints.load_checkpoint(latest)
    assert ck["trainer_state"]["step"] == 1
    import model
    model.load(ck["policy_dir"])


DIST_SCRIPT = os.path.join(ROOT, "tests", "dist_grad_check.py")


@pytest.mark.slow
@pytest.mark.parametrize("fsdp,extra", [(False, []), (True, []), (False, ["--ppo_epochs=2"]),
                                        (False, ["--dynamic_sampling=true"]), (False, ["--lora_rank=4"]),
                                        (True, ["--lora_rank=4"]), (False, ["--micro_batch_tokens=150"]),
                                        (True, ["--micro_batch_tokens=150"])])
def test_two_processes_match_one_process(tmp_path, fsdp, extra):
    """torchrun --nproc_per_node=2 (gloo): the same global batch gives the same loss and gradient (also with two
    PPO epochs, with dynamic sampling choosing informative groups across ranks, with LoRA adapters under DDP and
    FSDP2, where the reference is the policy with its adapters off, with micro-batches packed by tokens; under FSDP2
    the reference is sharded like the policy, and the KL term equal)."""
    outs = {}
    for n in (1, 2):
        out = str(tmp_path / f"p{n}")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               DIST_SCRIPT, out, str(fsdp), *extra]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        outs[n] = out
    from safetensors.torch import load_file
    g1, g2 = load_file(os.path.join(outs[1], "grads.safetensors")), load_file(os.path.join(outs[2], "grads.safetensors"))
    s1, s2 = json.load(open(os.path.join(outs[1], "stats.json"))), json.load(open(os.path.join(outs[2], "stats.json")))
    assert g1.keys() == g2.keys() and len(g1) > 10
    worst = max(float((g1[k] - g2[k]).abs().max()) for k in g1)
    assert worst <= 1e-5, worst
    assert abs(s1["pg_loss"] - s2["pg_loss"]) <= 1e-5 and abs(s1["kl"] - s2["kl"]) <= 1e-5
    assert s1["draws"] == s2["draws"]
    assert any(float(g.abs().max()) > 0 for g in g1.values())


def make_real_checkpoint(path):
    """A tiny random Qwen3-VL + tokenizer + processor settings in Hugging Face layout (no downloads)."""
    import model
    from data.prompt import STEP_GUIDED_PROMPT
    from model.processor import Processor
    from tiny import tiny_qwen3vl_config
    from model.tokenizer import build_tokenizer, vision_token_ids
    corpus = [STEP_GUIDED_PROMPT, "What is shown here? Is this dangerous to eat?",
              "I see a cup. <visual_safe>safe</visual_safe> <text_safe>safe</text_safe> "
              "<combined_safe>unsafe</combined_safe></think>\n<answer>Sorry, I cannot help.</answer>"] * 4
    tok = build_tokenizer(corpus, vocab_size=400)
    cfg = tiny_qwen3vl_config(vocab_size=len(tok), **vision_token_ids(tok))
    model.save(model.Qwen3VL(cfg).init_weights(seed=0), path)
    Processor(tok, patch_size=16, min_pixels=32 * 32, max_pixels=64 * 64).save(path)


def test_real_checkpoint_and_safetag_dataset(tmp_path):
    """--model=<HF dir> --data=<SafeTag JSONL>: the real configuration (step-guided prompt, paper reward)."""
    from PIL import Image
    ckpt = str(tmp_path / "ckpt")
    make_real_checkpoint(ckpt)
    rows = []
    for i in range(4):
        Image.new("RGB", (40 + 8 * i, 48), (30 * i, 100, 200)).save(tmp_path / f"img{i}.png")
        tags = ("safe", "unsafe")
        rows.append({"prompt": "<image>What is shown here?" if i % 2 else "Is this dangerous to eat?",
                     "images": [f"img{i}.png"], "image_tag": tags[i % 2], "text_tag": "safe",
                     "combine_tag": tags[(i // 2) % 2]})
    for split in ("train", "test"):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    out = str(tmp_path / "run")
    summary = train.main([f"--model={ckpt}", f"--data={tmp_path}", f"--image_root={tmp_path}", f"--out_dir={out}",
                          "--max_steps=1", "--prompts_per_step=2", "--mini_batch_prompts=2", "--group_size=2",
                          "--micro_batch_size=4", "--max_new_tokens=6", "--lr=1e-5", "--eval_batch_size=4",
                          "--threads=1"])
    assert set(summary) == {"before", "after"} and summary["after"]["n"] == 4
    rows = read_metrics(out)
    assert len(rows) == 1 and rows[0]["kl"] == rows[0]["kl"]
    import model
    model.load(os.path.join(checkpoints.latest_checkpoint(out), "policy"))
    cfg = json.load(open(os.path.join(checkpoints.latest_checkpoint(out), "trainer_state.json")))["config"]
    assert cfg["step_guided"] is True and cfg["lr"] == 1e-5 and cfg["group_size"] == 2


def test_decoded_response_with_stop_token_passes_the_format_gate(tmp_path):
    """The sampler keeps the stop token in the response; the reward must see the text without it."""
    import model
    import rewards
    from data import toy
    from rollout.engine import Rollout
    toy.build_checkpoint(str(tmp_path), seed=0)
    processor = model.load_processor(str(tmp_path))
    rec = toy.records("test", 1, seed=0)[0]
    text = toy.reference_response(rec)
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"] + [processor.stop_token_ids[0]]
    ro = Rollout(prompt_index=torch.zeros(1, dtype=torch.long), response_ids=torch.tensor([ids + [0, 0]]),
                 response_mask=torch.tensor([[1.0] * len(ids) + [0.0, 0.0]]), logprobs=torch.zeros(1, len(ids) + 2),
                 finish_reason=["stop"])
    decoded = train.decode_responses(processor, ro)
    assert decoded == [text]
    assert rewards.score(decoded[0], rec.labels)[0] == 1.0


@pytest.mark.slow
def test_fsdp_two_processes_checkpoint_and_resume(tmp_path):
    """torchrun --nproc_per_node=2 --fsdp=true: checkpoints gather the sharded policy and optimizer state on every
    rank (rank 0 writes), and a run resumed from step 1 repeats the uninterrupted run's steps 2 and 3. The
    uninterrupted run gives the engine's memory back before each update (--free_rollout_memory=auto under FSDP2) and
    the resumed one keeps it: the same numbers either way."""
    def torchrun(out, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
               *TINY, "--fsdp=true", "--lr_schedule=constant", f"--out_dir={out}", *extra]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    torchrun(full)
    torchrun(part, "--max_steps=1", "--free_rollout_memory=false")
    torchrun(part, "--resume=true", "--free_rollout_memory=false")
    a, b = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in a] == [1, 2, 3] and [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for k, v in ra.items():
            assert rb[k] == (None if v is None else pytest.approx(v, rel=1e-5, abs=1e-6)), (ra["step"], k)
    ck = checkpoints.load_checkpoint(checkpoints.latest_checkpoint(part))
    assert ck["trainer_state"]["step"] == 3 and ck["optimizer"]["state"]  # the full optimizer state, by name
    import model
    model.load(ck["policy_dir"])
