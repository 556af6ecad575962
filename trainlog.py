"""Training logs: one console line per step, metrics.jsonl, optional wandb, and curves.png at the end."""
import json
import os

# The console line: (metric key, label, format) in the order printed.
CONSOLE = [
    ("reward", "reward", "{:.3f}"), ("format", "fmt", "{:.2f}"), ("tag", "tag", "{:.2f}"),
    ("behavior", "beh", "{:.2f}"), ("refusal_unsafe", "ref+", "{:.2f}"), ("over_refusal_safe", "ref-", "{:.2f}"),
    ("kl", "kl", "{:.4f}"), ("clipfrac", "clip", "{:.3f}"),
    ("entropy", "ent", "{:.3f}"), ("response_len", "len", "{:.1f}"), ("grad_norm", "gnorm", "{:.3f}"),
    ("tokens_per_s", "tok/s", "{:.0f}"), ("step_time", "s", "{:.2f}"),
]


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
            import wandb  # lazy: optional dependency, off by default
            self.wandb = wandb.init(project=wandb_project, config=config, resume="allow")

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
        if metrics.get("skipped"):
            parts.append("SKIPPED (non-finite)")
        return " | ".join(parts)

    def read(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        return [json.loads(line) for line in open(self.path) if line.strip()]


def plot_curves(rows: list[dict], path: str,
                keys=("reward", "format", "tag", "behavior", "refusal_unsafe", "over_refusal_safe", "kl", "entropy", "response_len", "clipfrac")) -> str | None:
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
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
    return path
