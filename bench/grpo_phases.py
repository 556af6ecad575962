"""Where a GRPO step's time goes, for bench/grpo_step.py --profile: functions wrapped in place to time named phases
(ours and TRL's), and the table that prints them."""
import resource
import time


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Phases:
    """Wall and CPU seconds per named phase, by wrapping functions in place (a phase's time includes the phases
    nested in it), and how many MiB each phase raised the peak RSS by (the phase that sets the peak shows it).
    reset() after the warm-up steps, so the totals cover the timed steps only."""

    def __init__(self):
        self.totals, self.rss, self.active = {}, {}, False

    def wrap(self, owner, name: str, label):
        """Time owner.name under `label` (a string, or a function of the call's arguments giving one)."""
        fn = getattr(owner, name)

        def timed(*args, **kwargs):
            key = label(*args, **kwargs) if callable(label) else label
            w, c, m = time.perf_counter(), time.process_time(), _rss_mib()
            try:
                return fn(*args, **kwargs)
            finally:
                # the peak is usually set in the warm-up step, so this one is kept from the first call on
                self.rss[key] = max(self.rss.get(key, 0.0), _rss_mib() - m)
                if self.active:
                    t = self.totals.setdefault(key, [0.0, 0.0])
                    t[0] += time.perf_counter() - w
                    t[1] += time.process_time() - c
        setattr(owner, name, timed)

    def reset(self):
        self.totals, self.active = {}, True


PHASES = Phases()


def profile_ours(ref_holder: dict):
    import torch

    import grpo
    import train
    from rollout import step
    P = PHASES
    P.wrap(train, "encode", "prompt encoding (chat template, image patches)")
    P.wrap(train, "rollout", "rollout total (generate + decode + reward)")
    P.wrap(step, "prefill", "  prefill (vision + prompt)")
    P.wrap(step.DecodeState, "step", "  decode steps")
    P.wrap(step, "sample", "  sampling (softmax, cumsum)")
    P.wrap(train, "micro_logprobs", lambda model, *a, **k:
           "reference forward" if model is ref_holder.get("ref") else "policy forward (+ log-probs)")
    P.wrap(grpo, "policy_loss", "loss (clip, KL, entropy)")
    P.wrap(torch.Tensor, "backward", "backward")
    P.wrap(torch.nn.utils, "clip_grad_norm_", "grad clip")
    P.wrap(torch.optim.AdamW, "step", "optimizer step")


def profile_trl():
    import torch
    import trl.trainer.grpo_trainer as G
    from accelerate import Accelerator
    P = PHASES
    P.wrap(G.GRPOTrainer, "_tokenize_prompts", "prompt encoding (chat template, image patches)")
    P.wrap(G.GRPOTrainer, "_generate_and_score_completions", "rollout total (generate + decode + reward)")
    P.wrap(G.GRPOTrainer, "_generate_single_turn", "  generate (HF, batch G, KV cache)")
    P.wrap(G.GRPOTrainer, "_calculate_rewards", "  reward")
    P.wrap(G.GRPOTrainer, "_get_per_token_logps_and_entropies", lambda self, model, *a, **k:
           "reference forward" if model is self.ref_model else "policy forward (+ log-probs)")
    P.wrap(G.GRPOTrainer, "compute_loss", "loss incl. policy forward")
    P.wrap(Accelerator, "backward", "backward")
    P.wrap(Accelerator, "clip_grad_norm_", "grad clip")
    P.wrap(torch.optim.AdamW, "step", "optimizer step")


# ----------------------------------------------------------------------------- one side, in a child process

PHASE_ORDER = (
    "prompt encoding (chat template, image patches)",
    "rollout total (generate + decode + reward)",
    "  prefill (vision + prompt)", "  decode forwards", "  sampling (softmax, cumsum)",
    "  generate (HF, batch G, KV cache)", "  reward",
    "reference forward", "policy forward (+ log-probs)", "loss (clip, KL, entropy)", "loss incl. policy forward",
    "backward", "grad clip", "optimizer step",
)


def print_phases(results: dict, sides: list, kls: list) -> None:
    """Seconds per timed step, wall / CPU, per phase (nested phases indented; TRL computes its reference
    log-probs inside its rollout, and its policy forward inside compute_loss)."""
    for kl in kls:
        cols = [(side, results[f"{side} kl={kl:g}"]) for side in sides]
        print(f"where the time goes, kl={kl:g} (s per step, wall / CPU; +MiB: how far the phase raised peak RSS):")
        print(f"  {'phase':50s}" + "".join(f"{side:>26s}" for side, _ in cols))
        labels = [l for l in PHASE_ORDER if any(l in r["phases"] for _, r in cols)]
        labels += sorted({l for _, r in cols for l in r["phases"]} - set(labels))
        for label in labels + ["whole step (median)"]:
            cells = []
            for _, r in cols:
                if label == "whole step (median)":
                    w, c, m = r["median_s"], r["median_cpu_s"], r["peak_rss_mib"] - r["rss_loaded_mib"]
                elif label in r["phases"]:
                    w, c, m = r["phases"][label]
                else:
                    cells.append(f"{'-':>26s}")
                    continue
                cells.append(f"{w:8.2f} / {c:6.2f} {'+' + str(round(m)):>7s}")
            print(f"  {label:50s}" + "".join(cells))
