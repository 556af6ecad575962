"""The evaluation report: report.json (everything), report.md (tables) and report.png (the headline scores
with their 95% intervals), built from the outputs, the judgments of each judge and the metrics."""
import json
import math
import os
from collections import Counter

from eval.benchmark_metrics import compute_metrics, reward_metrics


def build_report(benchmark: str, rows: list[dict], judged: dict, generation: dict | None = None) -> dict:
    """judged: {judge name: (judge settings, judgments aligned with rows)}. Returns the report dict."""
    report = {"benchmark": benchmark, "n_outputs": len(rows), "n_records": len({r["id"] for r in rows}),
              "answer_sources": dict(Counter(r.get("answer_source", "") for r in rows)),
              "finish_reasons": dict(Counter(r.get("finish_reason", "") for r in rows)),
              "generation": generation, "reward_metrics": reward_metrics(rows), "judges": {}}
    for name, (settings, judgments) in judged.items():
        unparsed = [j for j in judgments if j["label"] is None]
        report["judges"][name] = {
            "settings": settings, "n": len(judgments),
            "labels": dict(Counter(str(j["label"]) for j in judgments)),
            "unparsed": len(unparsed),
            "unparsed_examples": [{"id": j["id"], "sample": j.get("sample", 0), "raw": j.get("raw", "")[:300],
                                   "problem": j.get("problem", "")} for j in unparsed[:10]],
            "metrics": compute_metrics(benchmark, rows, judgments)}
    return report


def _pct(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def _value(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _table(metrics: list[dict]) -> list[str]:
    lines = ["| metric | group | rate % | 95% CI % | k / n | unparsed | better | ASR % |",
             "|---|---|---|---|---|---|---|---|"]
    for m in metrics:
        asr = _pct(1 - m["rate"]) if m["metric"] == "safety_score" and m["n"] else ""
        lines.append(f"| {m['metric']} | {m['group']} | {_pct(m['rate'])} | {_pct(m['low'])}-{_pct(m['high'])} | "
                     f"{m['k']} / {m['n']} | {m['unparsed']} | {'higher' if m['higher_is_better'] else 'lower'} | "
                     f"{asr} |")
    return lines


def to_markdown(report: dict) -> str:
    out = [f"# Safety evaluation: {report['benchmark']}", ""]
    sources = ", ".join(f"{k} {v}" for k, v in sorted(report["answer_sources"].items()))
    finishes = ", ".join(f"{k} {v}" for k, v in sorted(report["finish_reasons"].items()))
    out += [f"{report['n_outputs']} responses to {report['n_records']} records.",
            f"Answer spans: {sources} (none = the thinking never closed, so there is no answer to judge).",
            f"Finish reasons: {finishes}.", ""]
    gen = report.get("generation")
    if gen:
        decoding = "greedy" if gen.get("temperature", 0) == 0 else \
            f"temperature {gen['temperature']}, top-p {gen['top_p']}, top-k {gen['top_k']}"
        prompt = "off"
        if gen.get("step_guided"):
            prompt = f"on ({gen['prompt_file']})" if gen.get("prompt_file") else "on (data/prompt.py)"
        out += [f"Generation: model `{gen.get('model', '')}`, {decoding}, max {gen.get('max_new_tokens')} new tokens, "
                f"{gen.get('group_size', 1)} sample(s) per record, step-guided prompt {prompt}.", ""]
    if report.get("reward_metrics"):
        out += ["## Rule reward", "", "The responses scored by the paper's rule reward against the reference tags, as "
                "train.py's held-out evaluation scores them (a refusal is what the reward's keyword rule calls one).",
                "", "| metric | value |", "|---|---|"]
        out += [f"| {k} | {_value(v)} |" for k, v in report["reward_metrics"].items()] + [""]
    out += ["Rates are shares of judged responses with 95% Wilson intervals; unparsed verdicts are left out of n "
            "and counted. Safety score = 100 - ASR (attack success rate).", ""]
    for name, j in report["judges"].items():
        s = j["settings"]
        detail = ", ".join(f"{k}={v}" for k, v in s.items() if k not in ("keywords",))
        out += [f"## Judge `{name}`", "", f"Settings: {detail}.", "",
                f"Verdicts: {j['n']}; labels: " + ", ".join(f"{k} {v}" for k, v in sorted(j["labels"].items()))
                + f"; unparsed: {j['unparsed']}.", ""]
        headline = [m for m in j["metrics"] if m["headline"]]
        out += ["### Headline", ""] + _table(headline) + ["", "### All metrics", ""] + _table(j["metrics"]) + [""]
        if j["unparsed_examples"]:
            out += ["Unparsed verdicts (first ones):", ""]
            out += [f"- `{e['id']}` sample {e['sample']}: {json.dumps(e['raw'][:160])}"
                    + (f" ({e['problem']})" if e.get("problem") else "") for e in j["unparsed_examples"]]
            out += [""]
    return "\n".join(out)


def plot_headline(report: dict, path: str) -> None:
    """Horizontal bars of the headline rates (in %) of every judge, with their 95% intervals."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure        # no pyplot: no global state, no display needed (Agg)

    bars = [(f"{name}: {m['metric']} [{m['group']}] ({'higher' if m['higher_is_better'] else 'lower'} is better)",
             m) for name, j in report["judges"].items() for m in j["metrics"] if m["headline"] and m["n"]]
    fig = Figure(figsize=(10, 1.2 + 0.45 * max(1, len(bars))))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if bars:
        labels = [b[0] for b in bars]
        values = [100 * b[1]["rate"] for b in bars]
        errors = [[100 * (b[1]["rate"] - b[1]["low"]) for b in bars], [100 * (b[1]["high"] - b[1]["rate"]) for b in bars]]
        y = list(range(len(bars)))[::-1]
        ax.barh(y, values, xerr=errors, color=["tab:blue" if b[1]["higher_is_better"] else "tab:orange" for b in bars],
                capsize=3)
        ax.set_yticks(y, labels, fontsize=8)
        for yi, v, b in zip(y, values, bars):
            ax.text(102, yi, f"{v:.1f} ({b[1]['k']}/{b[1]['n']})", va="center", fontsize=7)   # beside the bars
    else:
        ax.text(0.5, 0.5, "no judged responses", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlim(0, 122)
    ax.set_xticks(range(0, 101, 20))
    ax.set_xlabel("%  (bars: 95% Wilson interval)")
    ax.set_title(f"{report['benchmark']}: {report['n_outputs']} responses")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_report(report: dict, out_dir: str) -> dict:
    """Write report.json, report.md and report.png into out_dir (each written then renamed); return paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"report.{k}") for k in ("json", "md", "png")}
    for kind, text in (("json", json.dumps(report, indent=2, ensure_ascii=False, default=str)),
                       ("md", to_markdown(report))):
        tmp = paths[kind] + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        os.replace(tmp, paths[kind])
    tmp = paths["png"] + ".tmp.png"
    plot_headline(report, tmp)
    os.replace(tmp, paths["png"])
    return paths
