"""The paper's ablation on the toy world, one command: tag + behavior, tag only, behavior only, strict reward.

The arms are the rule reward with both parts (the paper's), the tag reward only, the behavior reward only, and the
strict reward (the loopholes closed), each over several seeds; a markdown table of the held-out metrics (mean and
range over seeds) and one PNG of the arms' training curves.

    python -m eval.ablation --seeds 0,1,2 --jobs 2 --out runs/ablation
    python -m eval.ablation --seeds 0 --out runs/ablation_quick -- --max_steps=20   # train.py flags after --
Resumable: a run whose summary.json exists is not run again (an interrupted one starts over). Each run is
`python train.py --seed=S --out_dir=OUT/ARM-sS --threads=T` plus the arm's flags and the extra ones; --jobs runs
that many at once, --threads (default: the cores / jobs) each.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

from runtime.files import read_jsonl, write_atomic
from runtime.logs import save_figure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARMS = {  # name -> train.py flags
    "tag+behavior (paper)": [],
    "tag only": ["--behavior_weight=0"],
    "behavior only": ["--tag_weight=0"],
    "strict reward": ["--reward=strict"],
}
# (summary key, column) of the table: held-out greedy metrics after training, rates from the paper reward's
# components whatever reward was trained (safety_metrics.evaluate), the reward itself the paper's
COLUMNS = [("paper_reward", "reward (paper)"), ("format_rate", "format"), ("visual_acc", "visual tag"),
           ("text_acc", "text tag"), ("combined_acc", "combined tag"), ("compositional_refusal", "compositional refusal"),
           ("over_refusal_safe", "over-refusal"), ("refusal_unsafe", "refusal (unsafe)"), ("loophole_rate", "loophole")]


def slug(arm: str) -> str:
    return arm.split(" (")[0].replace("+", "_").replace(" ", "_")


def run_dir(out: str, arm: str, seed: int) -> str:
    return os.path.join(out, f"{slug(arm)}-s{seed}")


def command(arm: str, seed: int, out: str, threads: int, extra: list[str]) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "train.py"), f"--seed={seed}", f"--out_dir={run_dir(out, arm, seed)}",
            f"--threads={threads}", *ARMS[arm], *extra]


def run_all(runs: list[tuple[str, int]], out: str, jobs: int, threads: int, extra: list[str]) -> None:
    """Start the runs `jobs` at a time; print a line as each starts and ends (with its minutes and the time so far)."""
    pending, active, t0 = list(runs), {}, time.time()
    done = 0
    while pending or active:
        while pending and len(active) < jobs:
            arm, seed = pending.pop(0)
            os.makedirs(run_dir(out, arm, seed), exist_ok=True)
            log = open(os.path.join(run_dir(out, arm, seed), "train.log"), "w")
            active[(arm, seed)] = (subprocess.Popen(command(arm, seed, out, threads, extra), stdout=log,
                                                    stderr=subprocess.STDOUT, cwd=ROOT), log, time.time())
            print(f"[{(time.time() - t0) / 60:5.1f} min] start {arm}, seed {seed}", flush=True)
        time.sleep(2)
        for key, (proc, log, started) in list(active.items()):
            if proc.poll() is None:
                continue
            log.close()
            del active[key]
            done += 1
            state = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see train.log)"
            print(f"[{(time.time() - t0) / 60:5.1f} min] {state}: {key[0]}, seed {key[1]} in "
                  f"{(time.time() - started) / 60:.1f} min ({done}/{len(runs)})", flush=True)
            if proc.returncode:
                raise RuntimeError(f"{key[0]}, seed {key[1]}: train.py exited {proc.returncode}; see "
                                   f"{os.path.join(run_dir(out, *key), 'train.log')}")


def table(out: str, seeds: list[int]) -> str:
    head = "| arm | " + " | ".join(c for _, c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for arm in ARMS:
        after = [json.load(open(os.path.join(run_dir(out, arm, s), "summary.json")))["after"] for s in seeds]
        cells = []
        for key, _ in COLUMNS:
            values = [a[key] for a in after if isinstance(a.get(key), (int, float)) and not math.isnan(a[key])]
            cells.append("-" if not values else f"{sum(values) / len(values):.3f}" +
                         (f" ({min(values):.3f}-{max(values):.3f})" if len(values) > 1 else ""))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curves(out: str, seeds: list[int], path: str) -> str | None:
    """Per arm, the mean over seeds of the training curves (reward as trained, over-refusal, loophole rate, visual tag
    accuracy of the samples), one panel each."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [("reward", "reward (as trained)"), ("over_refusal_safe", "over-refusal (samples)"),
            ("loophole", "loophole rate (samples)"), ("visual_correct", "visual tag right (samples)")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2))
    for arm in ARMS:
        rows = []
        for s in seeds:
            rows.append([r for r in read_jsonl(os.path.join(run_dir(out, arm, s), "metrics.jsonl")) if "reward" in r])
        steps = min(len(r) for r in rows)
        for ax, (key, title) in zip(axes, keys):
            ys = [sum(r[i].get(key, math.nan) for r in rows) / len(rows) for i in range(steps)]
            ax.plot(range(1, steps + 1), ys, label=arm, lw=1.3)
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return save_figure(fig, path)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, each arm runs every one")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (0: the cores / jobs)")
    ap.add_argument("--out", default="runs/ablation", help="a folder per run, ablation.md, ablation.png")
    args = ap.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        print(f"error: --seeds={args.seeds!r}: expected comma-separated integers", file=sys.stderr)
        return 2
    if not seeds or args.jobs < 1:
        print("error: need at least one seed and --jobs >= 1", file=sys.stderr)
        return 2
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    runs = [(arm, s) for s in seeds for arm in ARMS]
    todo = [r for r in runs if not os.path.isfile(os.path.join(run_dir(args.out, *r), "summary.json"))]
    print(f"{len(runs)} runs ({len(ARMS)} arms x {len(seeds)} seeds), {len(runs) - len(todo)} already done; "
          f"{args.jobs} at a time, {threads} threads each", flush=True)
    t0 = time.time()
    try:
        run_all(todo, args.out, args.jobs, threads, extra)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    md = table(args.out, seeds)
    write_atomic(os.path.join(args.out, "ablation.md"),
                 (f"Held-out greedy metrics after training, mean (min-max) over seeds {seeds}; "
                  f"{(time.time() - t0) / 60:.1f} min for {len(todo)} runs.\n\n{md}\n").encode())
    png = curves(args.out, seeds, os.path.join(args.out, "ablation.png"))
    print(md)
    print(f"wrote {os.path.join(args.out, 'ablation.md')} and {png}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
