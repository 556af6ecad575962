"""Time rewards.score on ~1 MB adversarial responses (target: under 50 ms each), next to the released regex.

Run: `python bench/rewards.py [--mb 1.0] [--repeats 3]`. tests/test_rewards.py reuses adversarial_inputs().
"""
import argparse
import os
import re
import statistics
import sys
import time

if __name__ == "__main__":  # run as a script, this folder would shadow the top-level rewards module
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import rewards

V, T, C = ("<visual_safe>safe</visual_safe>", "<text_safe>unsafe</text_safe>", "<combined_safe>unsafe</combined_safe>")
LABELS = {"image_tag": "safe", "text_tag": "unsafe", "combine_tag": "unsafe"}


def _fill(unit, size, head="", tail=""):
    """head + unit repeated to about `size` chars + tail."""
    return head + unit * max(1, size // len(unit)) + tail


def adversarial_inputs(size=1_000_000):
    """{name: response} of about `size` chars each: the degenerate repetition a policy emits early in RL."""
    ok_head = f"<think>{V}{T}{C}"
    return {
        "unclosed visual openings": _fill("<visual_safe>", size),
        "alternating visual/text tags": _fill(V + T, size),  # cubic for the released regex
        "repeated complete triples": _fill(V + T + C, size, tail="</think><answer>no</answer>!"),
        "nested openings": _fill("<visual_safe><text_safe><combined_safe><think><answer>", size),
        "triples + </think> flood": _fill(V + T + C + "</think>", size, tail="<answer>"),
        "</think> + space flood, valid": _fill("</think> \n\t", size, head=ok_head, tail="<answer>Sorry.</answer>"),
        "<answer> flood, valid": _fill("<answer>", size, head=ok_head + "</think>", tail="</answer>"),
        "space before <answer>, valid": _fill(" ", size, head=ok_head + "</think>", tail="<answer>No.</answer>"),
        "near-miss complete tags": _fill("<visual_safe>safe</visual_safe", size),
        "non-ASCII case folding": _fill("<viſual_ſafe>ſafe</viſual_ſafe>İ</thin\u212a>", size),
        "keyword-prefix answer": _fill("sorr cann unsaf ", size, head=ok_head + "</think><answer>", tail="</answer>"),
        "one-sentence answer": _fill("i a.b not ", size, head=ok_head + "</think><answer>", tail="</answer>"),
        "huge think, valid": _fill("Let me think. ", size, head="<think>",
                                   tail=f"{V}{T}{C}</think><answer>No.</answer>"),
        "whitespace only": " " * size,
    }


def time_score(response, mode, repeats):
    """Median seconds of rewards.score(response, LABELS, mode)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        rewards.score(response, LABELS, mode=mode)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=1.0, help="size of each adversarial response in MB")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per input (median reported)")
    args = parser.parse_args()
    size = int(args.mb * 1_000_000)
    print(f"rewards.score on {size:,}-char adversarial responses (median of {args.repeats}); target < 50 ms")
    print(f"{'input':34s} {'paper ms':>9s} {'strict ms':>9s}  format(paper/strict)")
    worst = 0.0
    for name, response in adversarial_inputs(size).items():
        ms = [1e3 * time_score(response, mode, args.repeats) for mode in rewards.REWARD_MODES]
        fmts = [rewards.score(response, LABELS, mode=mode)[1]["format"] for mode in rewards.REWARD_MODES]
        worst = max(worst, *ms)
        print(f"{name:34s} {ms[0]:9.2f} {ms[1]:9.2f}  {fmts[0]}/{fmts[1]}")
    print(f"worst: {worst:.2f} ms")
    # The released gate (re.fullmatch over the whole response) on the same alternating tags, a few KB only.
    pattern = re.compile(rewards.PAPER_FORMAT_PATTERN, re.DOTALL | re.IGNORECASE)
    print("released regex gate on alternating visual/text tags (ours is the linear scan above):")
    for kb in (2, 4, 8):
        response = _fill(V + T, kb * 1000)
        start = time.perf_counter()
        pattern.fullmatch(response.strip())
        regex_ms = 1e3 * (time.perf_counter() - start)
        print(f"  {kb} KB: regex {regex_ms:8.2f} ms   ours {1e3 * time_score(response, 'paper', 3):6.3f} ms")


if __name__ == "__main__":
    main()
