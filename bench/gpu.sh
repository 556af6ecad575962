#!/usr/bin/env bash
# The GPU check, one script that finishes within 10 minutes on one NVIDIA GPU:
#   1. a Python environment (an existing CUDA one, or a venv made from requirements.txt),
#   2. the GPU tests (pytest -k "gpu or cuda"; ALL_TESTS=1: the whole suite with CUDA visible),
#   3. on a random-weight Qwen3-VL-2B-sized model (bf16, 1 image, G=8): the rollout engine's decode step (ms per
#      step at 8 / 64 / 256 rows, CUDA graph vs eager, kernels per step, GPU busy fraction, bandwidth bound); the
#      compiled step (--compile_rollout) vs eager layers; the step under FSDP2 (torchrun, one process) vs the plain
#      engine; tokens/s vs Hugging Face generate at 1 x 8 (512 new tokens) and 16 x 8 prompts (128); a rollout at
#      the paper's shape (8B-sized, 32 prompts of ~1,000 tokens with an image, G=8, responses of every length up
#      to 2,048 under a 20 GiB paged KV budget); sampler vs training forward log-probs in the trainer's precision;
#      one update micro-batch at the paper's shape (8B-sized, 8 x (1,000 + 4,096) tokens, activation checkpointing:
#      peak memory, tokens/s, MFU; today's path vs the masked one it replaced); full GRPO steps (8 prompts x 8 x 512)
#      with their time split,
#   4. one train.py step under torchrun with FSDP2 and activation checkpointing, and its peak GPU memory.
# Everything lands in $OUT (else runs/gpu_check): gpu_results.txt (summary), gpu_results.json, logs.tar.gz (a log
# per stage).
#
#   bash bench/gpu.sh               # on a GPU machine
#   bash bench/gpu.sh --dry-run     # (or SMALL=1) tiny model on the CPU: checks the plumbing anywhere
# Knobs (environment): PYTHON (interpreter to use), VENV (where to make one), G, N, RUNS, P, N_BATCH, MISMATCH_P,
# MISMATCH_N, GRPO_P, GRPO_STEPS, TRAIN_NEW_TOKENS, PAPER_P, PAPER_N, PAPER_KV_GB,
# ALL_TESTS=1, BUDGET_S (total seconds, default 560).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SMALL="${SMALL:-0}"
for arg in "$@"; do
  case "$arg" in
    --dry-run) SMALL=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "bench/gpu.sh: unknown argument $arg (use --dry-run or SMALL=1)" >&2; exit 2 ;;
  esac
done

START=$(date +%s)
BUDGET_S="${BUDGET_S:-560}"   # 10 minutes minus a margin for the summary
OUTDIR="${OUT:-$ROOT/runs/gpu_check}"
mkdir -p "$OUTDIR"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/safegrpo-gpu.XXXXXX")"   # checkpoints and run dirs: large, never under $OUT
trap 'rm -rf "$WORK"' EXIT
LOGS="$OUTDIR/logs"   # one log per stage; packed into logs.tar.gz at the end (few files travel back)
mkdir -p "$LOGS"
SUMMARY="$OUTDIR/gpu_results.txt"
JSON="$OUTDIR/gpu_results.json"
: > "$SUMMARY"
echo "{" > "$JSON.tmp"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if [ "$SMALL" = 1 ]; then
  G="${G:-2}"; N="${N:-8}"; RUNS="${RUNS:-1}"; TRAIN_NEW_TOKENS="${TRAIN_NEW_TOKENS:-8}"; SMALL_FLAG="--small"
  P="${P:-2}"; N_BATCH="${N_BATCH:-8}"; MISMATCH_P="${MISMATCH_P:-2}"; MISMATCH_N="${MISMATCH_N:-8}"
  GRPO_P="${GRPO_P:-2}"; GRPO_STEPS="${GRPO_STEPS:-2}"; PAPER_P="${PAPER_P:-2}"; PAPER_N="${PAPER_N:-32}"
  PAPER_KV_GB="${PAPER_KV_GB:-0.01}"
else
  G="${G:-8}"; N="${N:-512}"; RUNS="${RUNS:-2}"; TRAIN_NEW_TOKENS="${TRAIN_NEW_TOKENS:-64}"; SMALL_FLAG=""
  P="${P:-16}"; N_BATCH="${N_BATCH:-128}"; MISMATCH_P="${MISMATCH_P:-8}"; MISMATCH_N="${MISMATCH_N:-256}"
  GRPO_P="${GRPO_P:-8}"; GRPO_STEPS="${GRPO_STEPS:-2}"; PAPER_P="${PAPER_P:-32}"; PAPER_N="${PAPER_N:-2048}"
  PAPER_KV_GB="${PAPER_KV_GB:-20}"
fi

say() { echo "$*" | tee -a "$SUMMARY"; }
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET_S - $(elapsed) )); }
# stage_limit WANT: the seconds a stage may take, capped by what is left of the budget
stage_limit() { local l; l=$(left); [ "$1" -lt "$l" ] && echo "$1" || echo "$l"; }
add_json() { # add_json KEY FILE_WITH_RESULT_LINE
  local line; line=$(grep '^RESULT ' "$2" | tail -n 1 | cut -c8-)
  [ -n "$line" ] && echo "\"$1\": $line," >> "$JSON.tmp"
  echo "$line"
}
# run_stage NAME SECONDS CMD...: time-limited, output to $LOGS/NAME.log; returns the command's status
run_stage() {
  local name="$1" want="$2"; shift 2
  local limit; limit=$(stage_limit "$want")
  if [ "$limit" -lt 20 ]; then say "[$name] SKIPPED: only ${limit}s of the budget left"; return 124; fi
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then say "[$name] ok in ${dt}s"
  elif [ "$name" = tests ] && [ $rc -eq 5 ]; then say "[$name] collected no matching test in ${dt}s"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then say "[$name] TIMED OUT after ${dt}s (limit ${limit}s); tail of $name.log:"; tail -n 15 "$LOGS/$name.log" | tee -a "$SUMMARY"
  else say "[$name] FAILED (exit $rc) after ${dt}s; tail of $name.log:"; tail -n 15 "$LOGS/$name.log" | tee -a "$SUMMARY"
  fi
  return $rc
}

say "SafeGRPO GPU check  $(date -u +%Y-%m-%dT%H:%M:%SZ)  mode=$([ "$SMALL" = 1 ] && echo 'dry-run (tiny, CPU ok)' || echo full)  G=$G N=$N runs=$RUNS"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$SUMMARY"

# ---------------------------------------------------------------- 1. environment
# Use $PYTHON if given; else an interpreter that already has torch with CUDA (the repo's .venv, or python3 on an
# image that ships PyTorch); else make a venv from requirements.txt. Missing pure-Python requirements are
# installed into a venv that sees the system packages; offline, pip fails fast and we go on with what is there.
has_cuda_torch() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; }
has_torch() { "$1" -c 'import torch' >/dev/null 2>&1; }
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in "$ROOT/.venv/bin/python" "$(command -v python3)"; do
    if [ -x "$cand" ] && { has_cuda_torch "$cand" || { [ "$SMALL" = 1 ] && has_torch "$cand"; }; }; then PY="$cand"; break; fi
  done
fi
VENV="${VENV:-${TMPDIR:-/tmp}/safegrpo-gpu-venv}"
if [ -z "$PY" ]; then
  say "[env] no interpreter with CUDA torch found: making $VENV from requirements.txt"
  python3 -m venv --system-site-packages "$VENV" && \
    timeout "$(stage_limit 240)" "$VENV/bin/python" -m pip install -q --retries 1 --timeout 15 -r requirements.txt \
      > "$LOGS/env.log" 2>&1 || say "[env] pip install failed (see env.log); going on with what is installed"
  PY="$VENV/bin/python"
fi
MISSING=$("$PY" - <<'EOF'
import importlib.util
mods = {"transformers": "transformers", "tokenizers": "tokenizers", "safetensors": "safetensors", "einops": "einops",
        "numpy": "numpy", "PIL": "pillow", "pyarrow": "pyarrow", "tqdm": "tqdm", "matplotlib": "matplotlib",
        "pytest": "pytest"}
print(" ".join(pkg for mod, pkg in mods.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [ -n "$MISSING" ]; then
  if [ "$PY" != "$VENV/bin/python" ]; then
    python3 -m venv --system-site-packages "$VENV" >/dev/null 2>&1 || true
    [ -x "$VENV/bin/python" ] && PY="$VENV/bin/python"
  fi
  say "[env] installing missing requirements: $MISSING"
  REQS=$(for p in $MISSING; do grep -i "^$p==" requirements.txt | sed 's/ *#.*//'; done)
  timeout "$(stage_limit 120)" "$PY" -m pip install -q --retries 1 --timeout 15 $REQS >> "$LOGS/env.log" 2>&1 \
    || say "[env] could not install $MISSING (offline?); stages that need them will fail"
fi
ENV_LINE=$("$PY" -c 'import sys, torch, transformers; print(f"python {sys.version.split()[0]} torch {torch.__version__} (cuda {torch.version.cuda}, available {torch.cuda.is_available()}) transformers {transformers.__version__}")' 2>&1)
say "[env] $PY: $ENV_LINE"
if [ "$SMALL" != 1 ] && ! has_cuda_torch "$PY"; then
  say "[env] FAILED: torch sees no CUDA device; run with --dry-run on a machine without a GPU"
  echo "\"error\": \"no CUDA\"}" >> "$JSON.tmp"; mv "$JSON.tmp" "$JSON"; exit 1
fi
FAILED=0

# ---------------------------------------------------------------- 2. GPU tests
if [ "${ALL_TESTS:-0}" = 1 ]; then TEST_ARGS=(-q tests); TEST_WANT=240; else TEST_ARGS=(-q tests -k "gpu or cuda"); TEST_WANT=100; fi
run_stage tests "$TEST_WANT" "$PY" -m pytest "${TEST_ARGS[@]}" -p no:cacheprovider --continue-on-collection-errors
rc=$?
[ $rc -ne 0 ] && [ $rc -ne 5 ] && FAILED=1
say "[tests] pytest ${TEST_ARGS[*]}: $(grep -E '[0-9]+ (passed|failed|errors?|deselected)' "$LOGS/tests.log" | tail -n 1)"

# ---------------------------------------------------------------- 3. the rollout engine at 2B size
CKPT="$WORK/qwen3vl_2b_random"
# stage NAME SECONDS ARGS...: one gpu_check.py stage, its RESULT into the JSON and its SUMMARY into the summary
stage() {
  local name="$1" want="$2"; shift 2
  if run_stage "$name" "$want" "$PY" bench/gpu_check.py "$name" "$@"; then
    add_json "$name" "$LOGS/$name.log" > /dev/null
    say "[$name] $(grep '^SUMMARY ' "$LOGS/$name.log" | tail -n 1 | cut -c9-)"
  else FAILED=1; fi
}
if run_stage checkpoint 90 "$PY" bench/gpu_check.py checkpoint "$CKPT" $SMALL_FLAG; then
  add_json checkpoint "$LOGS/checkpoint.log" > /dev/null
  say "[checkpoint] $(grep '^SUMMARY ' "$LOGS/checkpoint.log" | tail -n 1 | cut -c9-)"
  stage decode 60 "$CKPT" --G "$G" --N "$N" $SMALL_FLAG
  stage compile 90 "$CKPT" --G "$G" --N "$N" $SMALL_FLAG
  if run_stage fsdp_decode 60 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 bench/gpu_check.py \
      fsdp_decode "$CKPT" --G "$G" --N "$N" $SMALL_FLAG; then
    add_json fsdp_decode "$LOGS/fsdp_decode.log" > /dev/null
    say "[fsdp_decode] $(grep '^SUMMARY ' "$LOGS/fsdp_decode.log" | tail -n 1 | cut -c9-)"
  else FAILED=1; fi
  stage sampler 120 "$CKPT" --G "$G" --N "$N" --P "$P" --N_batch "$N_BATCH" --runs "$RUNS"
  stage paper_rollout 120 - --G "$G" --P "$PAPER_P" --N "$PAPER_N" --budget_gb "$PAPER_KV_GB" $SMALL_FLAG
  stage update 90 - --rows 8 $SMALL_FLAG
  stage mismatch 45 "$CKPT" --G "$G" --P "$MISMATCH_P" --N "$MISMATCH_N" --micro 16
  stage grpo 90 "$CKPT" --G "$G" --P "$GRPO_P" --N "$N" --steps "$GRPO_STEPS" --micro 16
else FAILED=1; fi

# ---------------------------------------------------------------- 4. one FSDP2 + activation-checkpointing step
DATA="$WORK/safetag"
if [ -d "$CKPT" ] && run_stage data 30 "$PY" bench/gpu_check.py data "$DATA"; then
  TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node=1)
  if run_stage train 90 "${TORCHRUN[@]}" bench/gpu_check.py train --model="$CKPT" --data="$DATA" \
      --fsdp=true --activation_checkpointing=true --max_steps=1 --prompts_per_step=1 --mini_batch_prompts=1 \
      --group_size="$G" --micro_batch_size="$G" --max_new_tokens="$TRAIN_NEW_TOKENS" --max_prompt_len=1024 \
      --eval_every=0 --save_every=0 --keep_last=1 --out_dir="$WORK/run" $([ "$SMALL" = 1 ] && echo --device=cpu); then
    add_json train "$LOGS/train.log" > /dev/null
    say "[train] $(grep '^SUMMARY ' "$LOGS/train.log" | tail -n 1 | cut -c9-)"
    grep -E "^step|tokens_per_s|reward=" "$LOGS/train.log" | tail -n 2 | tee -a "$SUMMARY"
  else FAILED=1; fi
else FAILED=1; fi

tar czf "$OUTDIR/logs.tar.gz" -C "$OUTDIR" logs && rm -rf "$LOGS"
echo "\"elapsed_s\": $(elapsed), \"failed\": $FAILED}" >> "$JSON.tmp"
mv "$JSON.tmp" "$JSON"
say "done in $(elapsed)s (budget ${BUDGET_S}s); $([ $FAILED = 0 ] && echo 'all stages ok' || echo 'SOME STAGES FAILED'); results in $OUTDIR"
exit $FAILED
