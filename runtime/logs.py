"""Training logs: one console line per step, metrics.jsonl, optional wandb, and curves.png at the end."""
import json
import os

# The console line: (metric key, label, format) in the order printed.
CONSOLE = [
    ("reward", "reward", "{:.3f}"), ("format", "fmt", "{:.2f}"), ("tag", "tag", "{:.2f}"),
    ("behavior", "beh", "{:.2f}"), ("refusal_unsafe", "ref+", "{:.2f}"), ("over_refusal_safe", "ref-", "{:.2f}"),
    ("visual_acc_unsafe", "vis+", "{:.2f}"), ("visual_acc_safe", "vis-", "{:.2f}"),
    ("loophole", "hole", "{:.2f}"), ("kl", "kl", "{:.4f}"), ("clipfrac", "clip", "{:.3f}"), ("mismatch", "mism", "{:.1e}"),
    ("entropy", "ent", "{:.3f}"), ("response_len", "len", "{:.1f}"), ("padding", "pad", "{:.2f}"),
    ("grad_norm", "gnorm", "{:.3f}"),
    ("tokens_per_s", "tok/s", "{:.0f}"), ("step_time", "s", "{:.2f}"),
]


class StatSums:
    """A step's loss statistics (grpo.policy_loss's stats) summed over micro-batches, then over ranks (reduce):
    `shares` are shares of a mini-batch value (their sum is that value), the rest token means of a micro-batch
    (weighted by its tokens); ratio_min/ratio_max/mismatch_max keep extremes; count() tallies updates."""

    EXTREMES = {"ratio_min": min, "ratio_max": max, "mismatch_max": max}

    def __init__(self, shares=()):
        self.shares, self.sums, self.extremes, self.counts, self.weight = set(shares), {}, {}, {}, 0.0

    def add(self, stats: dict, weight: float) -> None:
        for k, v in stats.items():
            v = float(v)
            if k in self.EXTREMES:
                self.extremes[k] = self.EXTREMES[k](self.extremes.get(k, v), v)
            else:
                self.sums[k] = self.sums.get(k, 0.0) + (v if k in self.shares else v * weight)
        self.weight += weight

    def count(self, name: str, **values) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def reduce(self, device) -> dict:
        """Means over all ranks: shares per mini-batch, token means per token, grad_norm per update; extremes of
        this rank; the counts."""
        from runtime.parallel import all_reduce_sum
        minibatches = max(1, self.counts.get("updates", 0) + self.counts.get("skipped_updates", 0))
        totals = all_reduce_sum(dict(self.sums, _weight=self.weight), device)
        weight = totals.pop("_weight") or 1.0
        out = {k: v / (minibatches if k in self.shares else max(1, self.counts.get("updates", 0))
                       if k == "grad_norm" else weight) for k, v in totals.items()}
        if "clipfrac_low" in out:
            out["clipfrac"] = out["clipfrac_low"] + out.get("clipfrac_high", 0.0)
        return out | self.extremes | {"updates": self.counts.get("updates", 0),
                                      "skipped_updates": self.counts.get("skipped_updates", 0)}


def start_wandb(out_dir: str, project: str, config: dict | None):
    """A wandb run (--wandb=true) writing its files under <out_dir>/wandb. With WANDB_MODE=offline nothing leaves the
    machine (`wandb sync <out_dir>/wandb/offline-run-*` uploads it later). Errors say what to do, for train.py's CLI."""
    try:
        import wandb  # lazy: an optional dependency, off by default
    except ImportError as e:
        raise RuntimeError("--wandb=true needs the wandb package, which is not installed here: "
                           "pip install -r requirements.txt (or pip install wandb), or run with --wandb=false") from e
    try:
        return wandb.init(project=project, config=config, dir=out_dir, resume="allow")
    except Exception as e:  # wandb's own errors (no API key, no network, bad settings) derive from Exception
        raise RuntimeError(f"--wandb=true: wandb could not start a run ({type(e).__name__}: {e}); log in with "
                           f"`wandb login` or set WANDB_API_KEY, or set WANDB_MODE=offline to keep the run in "
                           f"{os.path.join(out_dir, 'wandb')}") from e


class MetricsLog:
    """Appends one JSON object per step to <out_dir>/metrics.jsonl (rank 0 only)."""

    def __init__(self, out_dir: str, enabled: bool, use_wandb: bool = False, wandb_project: str = "",
                 config: dict | None = None, resume_step: int = 0):
        self.enabled = enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.wandb = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        # On resume, drop lines written after the checkpoint we resume from, so the file reads as one run.
        if os.path.exists(self.path):
            keep = [line for line in open(self.path) if line.strip()
                    and json.loads(line).get("step", 0) <= resume_step]
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(keep)
            os.replace(tmp, self.path)
        if use_wandb:
            self.wandb = start_wandb(out_dir, wandb_project, config)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def console(self, step: int, total: int, metrics: dict) -> str:
        parts = [f"step {step}/{total}"]
        for key, label, fmt in CONSOLE:
            if key in metrics:
                parts.append(f"{label} {fmt.format(metrics[key])}")
        if metrics.get("skipped_updates"):
            parts.append("SKIPPED (non-finite)")
        return " | ".join(parts)

    def read(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        return [json.loads(line) for line in open(self.path) if line.strip()]

    def close(self) -> None:
        """The end of the run: the wandb run is finished (its files complete; uploaded unless offline)."""
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


CURVES = ("reward", "format", "tag", "behavior", "refusal_unsafe", "over_refusal_safe", "loophole", "kl", "entropy",
          "response_len", "clipfrac", "mismatch")


def plot_curves(rows: list[dict], path: str, keys=CURVES) -> str | None:
    """A grid of metric-vs-step curves saved as PNG (matplotlib, Agg backend: no display needed)."""
    rows = [r for r in rows if "reward" in r]
    keys = [k for k in keys if any(k in r for r in rows)]
    if not rows or not keys:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    nrows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.5)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    return save_figure(fig, path)


def save_figure(fig, path: str) -> str:
    """A matplotlib figure as PNG, atomically (written beside, then renamed), and closed."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
    return path
