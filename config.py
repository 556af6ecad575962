"""The training configuration: one dataclass, `--key=value` overrides, the toy preset.

Defaults are the paper's hyperparameters (../shared/PAPER.md section 5, Qwen3-VL-8B on 4x A100 with
verl); `python train.py` with no arguments applies TOY_PRESET on top, for the built-in toy world.
"""
import dataclasses
import json
import sys
from dataclasses import dataclass, fields


@dataclass
class Config:
    # ---- what to train on
    model: str = "toy"                 # local Hugging Face checkpoint dir, or "toy" (built-in toy world)
    data: str = "toy"                  # SafeTag-VL-3K parquet / JSONL / datasets dir, or "toy"
    train_split: str = "train"         # split names inside `data`
    eval_split: str = "test"
    image_root: str = ""               # folder for relative image paths in a JSONL dataset
    prompt_file: str = ""              # step-guided instruction override (empty: data/prompt.py's wording)
    step_guided: bool = True           # append the step-guided instruction to every question (PAPER §2)
    out_dir: str = "runs/safegrpo"     # checkpoints, metrics.jsonl, curves.png, summary.json
    seed: int = 0                      # one seed for data order, sampling and initialisation
    # ---- GRPO schedule (PAPER §5)
    epochs: int = 15                   # passes over the training prompts
    max_steps: int = 0                 # stop after this many steps (0: run all epochs)
    prompts_per_step: int = 256        # prompts per rollout step, global over ranks
    group_size: int = 8                # G rollouts per prompt
    mini_batch_prompts: int = 64       # prompts per optimizer update (256/64 = 4 updates per step)
    micro_batch_size: int = 16         # sequences per forward/backward on one rank (gradient accumulation)
    ppo_epochs: int = 1                # mu: passes over each step's rollouts
    # ---- optimizer
    lr: float = 1e-6                   # AdamW learning rate
    weight_decay: float = 0.01         # AdamW weight decay (verl's default)
    warmup_steps: int = 0              # linear warmup, in optimizer updates
    lr_schedule: str = "constant"      # constant | cosine (after warmup)
    grad_clip: float = 1.0             # max global grad norm
    # ---- loss (grpo.py)
    clip_low: float = 0.2              # PPO clip: ratio >= 1 - clip_low for negative advantages
    clip_high: float = 0.2             # PPO clip: ratio <= 1 + clip_high for positive advantages
    dual_clip: float = 3.0             # dual-clip constant c (> 1) for negative advantages (verl's default 3.0); 0: off
    kl_coef: float = 0.01              # weight of KL(policy || frozen reference) in the loss; 0: no reference model
    kl_kind: str = "k3"                # k1 | k2 | k3 (low_var_kl) | abs
    entropy_coef: float = 0.0          # entropy bonus weight (paper: 0)
    loss_agg: str = "token-mean"       # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm
    adv_scale: str = "group"           # group: (r - mean) / (std + eps); none: r - mean (Dr. GRPO)
    reward: str = "paper"              # paper | strict | module:function (see rewards.resolve_reward)
    # ---- sampling
    temperature: float = 1.0           # rollout temperature (the training forward divides by it too)
    top_p: float = 1.0
    top_k: int = 0
    max_prompt_len: int = 2048         # longer prompts are an error, not silently cut
    max_new_tokens: int = 4096         # response budget per rollout
    rollout_kv_gb: float = 0.0         # KV-cache budget of the rollout engine per GPU; prompts beyond it wait for free
                                       # slots (0: a third of the free GPU memory less optimizer state; no limit on CPU)
    # ---- evaluation, checkpoints, logging
    eval_every: int = 10               # held-out greedy evaluation every N steps (0: only before/after)
    eval_size: int = 0                 # held-out prompts to evaluate (0: all)
    eval_batch_size: int = 32          # prompts per greedy generation batch
    save_every: int = 10               # checkpoint every N steps (and at the end)
    keep_last: int = 2                 # checkpoints kept on disk
    resume: bool = False               # continue from the latest checkpoint in out_dir
    wandb: bool = False                # log to Weights & Biases (lazy import)
    wandb_project: str = "safegrpo"
    # ---- systems
    device: str = "auto"               # auto | cpu | cuda
    dtype: str = "auto"                # auto (fp32 on CPU, bf16 autocast on GPU) | fp32 | bf16
    fsdp: bool = False                 # FSDP2 fully_shard per decoder block instead of DDP
    activation_checkpointing: bool = False
    shared_prefix: bool = True         # training forward runs each prompt (and image) once per group, not G times
    max_nonfinite: int = 3             # stop after this many skipped (non-finite) updates
    threads: int = 0                   # torch CPU threads per process (0: leave torch's default)
    # ---- toy world (used when model == "toy")
    toy_train_size: int = 0            # training prompts drawn from the toy world
    toy_eval_size: int = 0             # held-out prompts
    warmstart_steps: int = 0           # supervised warm-start updates on image-blind tags
    warmstart_lr: float = 0.0
    warmstart_batch_size: int = 0

    def __post_init__(self):
        if self.prompts_per_step % self.mini_batch_prompts:
            raise ValueError(f"prompts_per_step={self.prompts_per_step} is not a multiple of "
                             f"mini_batch_prompts={self.mini_batch_prompts}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.rollout_kv_gb < 0:
            raise ValueError(f"--rollout_kv_gb={self.rollout_kv_gb} must be >= 0 (0: automatic)")
        for name in ("loss_agg", "adv_scale", "kl_kind", "lr_schedule", "dtype", "device"):
            allowed = CHOICES[name]
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name}={getattr(self, name)!r} is not one of {allowed}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


CHOICES = {
    "loss_agg": ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"),
    "adv_scale": ("group", "none"),
    "kl_kind": ("k1", "k2", "k3", "abs"),
    "lr_schedule": ("constant", "cosine"),
    "dtype": ("auto", "fp32", "bf16"),
    "device": ("auto", "cpu", "cuda"),
}

# The toy world trains a ~1M-parameter VLM on CPU in minutes: far higher lr, small batches, short responses.
TOY_PRESET = dict(
    epochs=1000, max_steps=150, prompts_per_step=32, group_size=8, mini_batch_prompts=32,
    micro_batch_size=256, lr=5e-4, lr_schedule="cosine", warmup_steps=0, kl_coef=0.01, max_prompt_len=512,
    max_new_tokens=80,
    eval_every=0, save_every=20, eval_batch_size=128, step_guided=False,
    toy_train_size=2000, toy_eval_size=300, warmstart_steps=300, warmstart_lr=3e-3, warmstart_batch_size=32,
    out_dir="runs/toy",
)


def _convert(field: dataclasses.Field, text: str):
    kind = field.type
    if kind is bool:
        low = text.lower()
        if low not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(f"--{field.name}={text!r}: expected true or false")
        return low in ("1", "true", "yes")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"--{field.name}={text!r}: expected a value of type {kind.__name__}") from None


def parse_config(argv: list[str] | None = None) -> Config:
    """`--key=value` (or `--key value`, or a bare `--flag` for booleans) for every Config field."""
    argv = sys.argv[1:] if argv is None else argv
    by_name = {f.name: f for f in fields(Config)}
    given, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}: use --key=value (see `python train.py --help`)")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in by_name:
            raise ValueError(f"unknown option --{key}; known options: {', '.join(sorted(by_name))}")
        if not eq:
            if by_name[key].type is bool and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
                value = "true"
            elif i + 1 < len(argv):
                i, value = i + 1, argv[i + 1]
            else:
                raise ValueError(f"--{key} needs a value")
        given[key] = _convert(by_name[key], value)
        i += 1
    values = dict(given)
    if given.get("model", Config.model) == "toy":
        for key, value in TOY_PRESET.items():
            values.setdefault(key, value)  # an explicit flag always wins over the preset
    return Config(**values)


def help_text() -> str:
    lines = ["usage: python train.py [--key=value ...]   (torchrun --nproc_per_node=N train.py ... for N processes)", ""]
    for f in fields(Config):
        lines.append(f"  --{f.name}={f.default!r}")
    return "\n".join(lines)
