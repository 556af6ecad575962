"""The training configuration: one dataclass, `--key=value` overrides, the toy preset.

Defaults are the paper's setting (docs/method.md#training-setup: Qwen3-VL-8B-Thinking, verl's GRPO on 4x A100);
`python train.py` with no arguments applies TOY_PRESET on top, for the built-in toy world. The comment on each
field is its `python train.py --help` text; the `# ----` lines are the help's groups.
"""
import dataclasses
import inspect
import json
import re
import sys
from dataclasses import dataclass, fields


@dataclass
class Config:
    # ---- model and data
    model: str = "toy"                 # local Hugging Face checkpoint dir, or "toy" (the built-in toy world)
    data: str = "toy"                  # SafeTag-VL-3K parquet / JSONL / datasets dir, or "toy"
    train_split: str = "train"         # split names inside `data`
    eval_split: str = "test"
    image_root: str = ""               # folder for relative image paths in a JSONL dataset
    prompt_file: str = ""              # step-guided instruction override (empty: data/prompt.py's wording)
    step_guided: bool = True           # append the step-guided instruction to every question
    max_prompt_len: int = 2048         # longer prompts are dropped when the data is loaded (counted, reported)
    drop_last: bool = True             # an epoch is only whole steps (verl); false: wrap into the next epoch
    seed: int = 0                      # one seed for data order, sampling and initialisation
    # ---- rollout
    prompts_per_step: int = 256        # prompts per rollout step, global over ranks
    group_size: int = 8                # G rollouts per prompt
    temperature: float = 1.0           # rollout temperature (the training forward divides by it too)
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 4096         # response budget per rollout
    rollout_kv_gb: float = 0.0         # KV-cache budget of the rollout engine per GPU: paged, rows take blocks as they
                                       # grow, prompts wait for free blocks (0: a third of the free GPU memory less
                                       # optimizer state; on CPU no limit, every row's tokens reserved)
    free_rollout_memory: str = "auto"  # give the engine's KV store, weight copies and CUDA graphs back before each
                                       # update (verl frees vLLM's the same way), rebuilt and recaptured at the next
                                       # rollout: auto (on under FSDP2, whose engine holds a whole bf16 copy of the
                                       # model) | true | false
    compile_rollout: str = "auto"      # torch.compile each decoder layer of the decode step (once for all layers and
                                       # shapes; CUDA graphs capture it): auto (on for CUDA) | true | false
    dynamic_sampling: bool = False     # DAPO: keep groups whose rewards differ, drawing more prompts to fill the step
    max_draws: int = 4                 # dynamic sampling: rollouts of prompts_per_step prompts per step at most
    # ---- reward and advantages
    reward: str = "paper"              # paper | strict | module:function (see rewards.resolve_reward)
    tag_weight: float = 0.5            # weight of the tag reward in the rule reward (paper: 0.5; 0 leaves it out)
    behavior_weight: float = 0.5       # weight of the behavior reward (paper: 0.5; 0 leaves it out)
    adv_estimator: str = "grpo"        # grpo: r - group mean | rloo: r - mean of the other G-1 rewards
    adv_scale: str = "group"           # group: / (group std + eps) | batch: / batch std | none (Dr. GRPO)
    overlong_buffer: int = 0           # DAPO: penalise responses in the last N tokens of max_new_tokens (0: off)
    overlong_penalty: float = 1.0      # DAPO: the penalty at max_new_tokens, reached linearly over the buffer
    kl_in_reward: bool = False         # KL to the reference as a per-token reward penalty (verl) instead of a loss term
    kl_target: float = 0.0             # KL in the reward: adaptive controller's target (0: fixed coefficient kl_coef)
    kl_horizon: int = 10000            # KL in the reward: adaptive controller's horizon, in samples
    # ---- loss (grpo.py)
    clip_low: float = 0.2              # PPO clip: ratio >= 1 - clip_low for negative advantages
    clip_high: float = 0.2             # PPO clip: ratio <= 1 + clip_high for positive advantages (DAPO: 0.28)
    dual_clip: float = 3.0             # dual-clip constant c (> 1) for negative advantages (verl's 3.0); 0: off
    ratio_level: str = "token"         # token: PPO/GRPO | sequence: GSPO's length-normalised sequence ratio
    tis_cap: float = 0.0               # truncated importance sampling: weight min(exp(old - sampler), cap) (0: off)
    old_logprobs: str = "auto"         # behaviour log-probs: sampler | recompute (training forward) | auto:
                                       # recompute when the policy runs in bf16, sampler in fp32 (exact there)
    kl_coef: float = 0.01              # weight of KL(policy || frozen reference); 0: no reference model
    kl_kind: str = "k3"                # k1 | k2 | k3 (low_var_kl) | abs
    entropy_coef: float = 0.0          # entropy bonus weight (paper: 0)
    loss_agg: str = "token-mean"       # token-mean (global) | token-mean-micro (the paper's verl) |
                                       # seq-mean-token-mean | seq-mean-token-sum-norm
    mask_truncated: bool = False       # DAPO: responses cut at max_new_tokens leave the loss
    # ---- optimization
    epochs: int = 15                   # passes over the training prompts
    max_steps: int = 0                 # stop after this many steps (0: run all epochs)
    mini_batch_prompts: int = 64       # prompts per optimizer update (256/64 = 4 updates per step)
    micro_batch_size: int = 16         # sequences per forward/backward on one rank (gradient accumulation)
    micro_batch_tokens: int = 0        # pack micro-batches by tokens instead: rows sorted by length, at most this many
                                       # rows x (prompt + response) positions each (verl's dynamic batch size; 0: off)
    ppo_epochs: int = 1                # mu: passes over each step's rollouts
    lr: float = 1e-6                   # AdamW learning rate
    weight_decay: float = 0.01         # AdamW weight decay (verl's default)
    warmup_steps: int = 0              # linear warmup, in optimizer updates
    lr_schedule: str = "constant"      # constant | cosine (after warmup)
    grad_clip: float = 1.0             # max global grad norm
    max_nonfinite: int = 3             # stop after this many skipped (non-finite) updates
    # ---- LoRA and frozen parts
    lora_rank: int = 0                 # low-rank adapters of this rank on the decoder's projections (0: full)
    lora_alpha: float = 16.0           # adapter scale alpha / rank
    lora_targets: str = "q,k,v,o,gate,up,down"  # projections that get adapters
    lora_init: str = ""                # start from saved adapters (an adapter directory)
    freeze_vision: bool = False        # the vision tower and its mergers get no gradient and no optimizer state
    dry_run_memory: bool = False       # print the planned memory per GPU for these options and exit
    # ---- parallelism and precision
    device: str = "auto"               # auto | cpu | cuda
    dtype: str = "auto"                # auto (fp32 on CPU, bf16 autocast on GPU) | fp32 | bf16
    fsdp: bool = False                 # FSDP2 fully_shard per decoder block instead of DDP
    activation_checkpointing: bool = False  # recompute decoder blocks in backward
    shared_prefix: bool = True         # training forward runs each prompt (and image) once per group, not G times
    threads: int = 0                   # torch CPU threads per process (0: leave torch's default)
    # ---- evaluation, checkpoints, logging
    out_dir: str = "runs/safegrpo"     # checkpoints, final/ (the trained model), metrics.jsonl, curves.png
    eval_every: int = 10               # held-out greedy evaluation every N steps (0: only before/after)
    eval_size: int = 0                 # held-out prompts to evaluate (0: all)
    eval_batch_size: int = 32          # prompts per greedy generation batch
    save_every: int = 10               # checkpoint every N steps (and at the end)
    keep_last: int = 2                 # checkpoints kept on disk
    resume: bool = False               # continue from the latest checkpoint in out_dir
    wandb: bool = False                # log to Weights & Biases (imported only when on)
    wandb_project: str = "safegrpo"
    # ---- toy world (used when model == "toy")
    toy_train_size: int = 0            # training prompts drawn from the toy world
    toy_mix: str = ""                  # the toy world's subset weights, both splits: "benign,harmful_text,
                                       # visual_unsafe,compositional_unsafe,compositional_safe" (empty: data/toy.py's)
    toy_eval_size: int = 0             # held-out prompts
    toy_couple: float = 1.0            # warm start: how often a visual flip on a plain question also makes its
                                       # verdict unsafe (0: independent flips; with fewer, some seeds call every
                                       # picture safe: docs/method.md, "How the visual tag is learned")
    toy_risky_visual: float = 0.1      # warm start: how often a risky-sounding question's visual tag is flipped to
                                       # unsafe (a plain question's: 30%; at 30% too, "visual unsafe" becomes a
                                       # route to refusing the hazards)
    warmstart_steps: int = 0           # supervised warm-start updates on image-blind tags
    warmstart_lr: float = 0.0
    warmstart_batch_size: int = 0

    def __post_init__(self):
        if self.prompts_per_step % self.mini_batch_prompts:
            raise ValueError(f"--prompts_per_step={self.prompts_per_step} is not a multiple of "
                             f"--mini_batch_prompts={self.mini_batch_prompts}")
        for name in ("group_size", "prompts_per_step", "mini_batch_prompts", "micro_batch_size", "ppo_epochs",
                     "max_new_tokens", "max_prompt_len", "max_draws"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("rollout_kv_gb", "tis_cap", "overlong_buffer", "kl_target", "lora_rank", "entropy_coef",
                     "micro_batch_tokens", "tag_weight", "behavior_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name}={getattr(self, name)} must be >= 0")
        if self.overlong_buffer >= self.max_new_tokens:
            raise ValueError(f"--overlong_buffer={self.overlong_buffer} must be below "
                             f"--max_new_tokens={self.max_new_tokens}")
        if self.tag_weight == 0 and self.behavior_weight == 0:
            raise ValueError("--tag_weight=0 and --behavior_weight=0 leave no reward to learn from")
        if not 0 <= self.toy_couple <= 1:
            raise ValueError(f"--toy_couple={self.toy_couple} must be a probability in [0, 1]")
        if not 0 <= self.toy_risky_visual <= 1:
            raise ValueError(f"--toy_risky_visual={self.toy_risky_visual} must be a probability in [0, 1]")
        if self.toy_mix:
            from data.toy import mix
            mix(self.toy_mix)  # raises naming what is wrong
        if self.tis_cap and self.tis_cap < 1:
            raise ValueError(f"--tis_cap={self.tis_cap} must be >= 1 (it caps a weight that is 1 when nothing is off)")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name}={getattr(self, name)!r} is not one of {allowed}")
        targets = [t.strip() for t in self.lora_targets.split(",") if t.strip()]
        if self.lora_rank and (not targets or set(targets) - set(LORA_TARGETS)):
            raise ValueError(f"--lora_targets={self.lora_targets!r}: expected a comma-separated subset of "
                             f"{','.join(LORA_TARGETS)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


CHOICES = {
    "adv_estimator": ("grpo", "rloo"),
    "adv_scale": ("group", "batch", "none"),
    "ratio_level": ("token", "sequence"),
    "old_logprobs": ("auto", "sampler", "recompute"),
    "loss_agg": ("token-mean", "token-mean-micro", "seq-mean-token-mean", "seq-mean-token-sum-norm"),
    "kl_kind": ("k1", "k2", "k3", "abs"),
    "lr_schedule": ("constant", "cosine"),
    "dtype": ("auto", "fp32", "bf16"),
    "device": ("auto", "cpu", "cuda"),
    "compile_rollout": ("auto", "true", "false"),
    "free_rollout_memory": ("auto", "true", "false"),
}
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def frees_rollout_memory(choice: str, fsdp: bool) -> bool:
    """--free_rollout_memory resolved (train.py and the memory planner): auto is on under FSDP2, where the engine's
    whole bf16 copy of the model would otherwise sit through every update."""
    return choice == "true" or choice == "auto" and fsdp


# The toy world trains a ~1M-parameter VLM on CPU in minutes: far higher lr, small batches, short responses. Why these
# values, measured on earlier versions of the toy world (weapons in 15% of prompts, every warm-start visual flip also
# flipping the verdict). The policy first learns to refuse every compositional question, then to tell them apart by
# the picture. Plain GRPO at lr 5e-4 sometimes never settled that second phase (seed 0: over-refusal swinging between
# 0.3 and 0.8 at step 90); at 3e-4 it sometimes came too late (seed 3: compositional refusal 0.32 after 150 steps):
# once most groups are answered alike they get advantage 0 yet still dilute the token mean. Dynamic sampling (DAPO)
# fills each step with groups whose rewards differ (at most two rollouts of 16 prompts), and each step's 16 groups are
# two updates of 8 (32 prompts and one update per step took ~16 minutes on 2 cores; 16 and one update left seed 3
# over-refusing). KL 0.05, not the paper's 0.01: at 0.01 one run in 12 (seed 0, 1 thread) locked into a shortcut by
# step 40, "refuse every 'leave it on my baby's bed'" whatever the object; all 8 samples of such a prompt then refuse,
# the group's advantage is 0, and nothing pulls it back but the KL to the warm start, which still helps there 80% of
# the time. At 0.05 that run ended at over-refusal 0.014 (bench/README.md, the toy world before independent flips).
TOY_PRESET = dict(
    epochs=1000, max_steps=150, prompts_per_step=16, group_size=8, mini_batch_prompts=8,
    micro_batch_size=256, lr=3e-4, lr_schedule="cosine", warmup_steps=0, kl_coef=0.05, max_prompt_len=512,
    dynamic_sampling=True, max_draws=2,
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
        if key not in by_name:
            hint = f" (options use underscores: --{key.replace('-', '_')})" if key.replace("-", "_") in by_name else ""
            raise ValueError(f"unknown option --{key}{hint}; see `python train.py --help`")
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
    """Every option with its default and its comment, grouped as in the Config source."""
    lines = ["usage: python train.py [--key=value ...]   (torchrun --nproc_per_node=N train.py ... for N processes)",
             "With no --model, the toy world's preset applies (explicit options win)."]
    defaults = {f.name: f.default for f in fields(Config)}
    for line in inspect.getsource(Config).splitlines():
        group = re.match(r"\s*# ---- (.*)", line)
        field = re.match(r"\s*(\w+): \w+ = [^#]*?(?:#\s*(.*))?$", line)
        more = re.match(r"\s+# (.*)", line)
        if group:
            lines += ["", group.group(1) + ":"]
        elif field and field.group(1) in defaults:
            name = field.group(1)
            lines.append(f"  --{name}={defaults[name]!r}".ljust(34) + (field.group(2) or ""))
        elif more and not line.strip().startswith("# ----") and len(lines) > 2:
            lines.append(" " * 34 + more.group(1))
    return "\n".join(lines)
