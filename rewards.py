"""SafeGRPO rule rewards (docs/method.md#the-reward): pure functions of (response text, reference tags), linear time.

`score(response, labels, mode="paper"|"strict")` -> (reward, components); `score_batch` scores a rollout;
`resolve_reward("paper"|"strict"|"module:function")` backs train.py's `--reward` flag. No torch, no model.

Paper mode: our reading of the released reward (reward/safetygrpo.py), reproduced exactly:
- Format gate: `re.fullmatch(PAPER_FORMAT_PATTERN, response.strip(), DOTALL | IGNORECASE)`. Whether a
  lazy `.*?` or a greedy `.*` only changes which match is found, never whether one exists, so the gate is 1
  iff the stripped text holds complete tags V, T, C (`<visual_safe>safe|unsafe</visual_safe>` etc.) in that
  order without overlap, then `</think>`, whitespace (`\\s`, i.e. str.isspace), `<answer>`, anything, and it
  ends with `</answer>` (`$` can match before a final newline, but fullmatch must still consume it and the
  text is stripped, so the end is the end). `_paper_format` decides this with str.find; proof at the function.
- Tags: the FIRST complete occurrence of each tag anywhere (re.search), value = the matched text `.lower()`.
- Answer: `re.search(r"<answer>(.*?)</answer>", DOTALL | IGNORECASE)` = the first `<answer>` and the first
  `</answer>` after it (if the first `<answer>` has no closer after it, no later one does), `.strip().lower()`.
- Refusal: any keyword is a substring of that answer. Behavior = 1 iff predicted combined == reference combined
  and (refused if it is unsafe, not refused if it is safe). Total = format * (0.5 * tag + 0.5 * behavior).
- IGNORECASE follows Python's `re`, which matches more than ASCII case: U+0130 'İ' and U+0131 'ı' match 'i',
  U+017F 'ſ' matches 's', U+212A (Kelvin) matches 'k'. So `<viſual_safe>ſafe</viſual_safe>` passes the gate,
  but its value lower-cases to 'ſafe' != 'safe' and the tag is wrong: kept, as released.
- Only intended difference: a missing or invalid label raises ValueError (released code silently used "").
  Components also exist when the format is 0 (what the released functions would give), for logging; the
  `answer` component keeps the span's case (the keyword check lower-cases it).

Strict mode (opt-in), every difference from paper mode:
1. The think block is the text before the FIRST `</think>`; after it come optional whitespace, `<answer>`,
   the answer and a final `</answer>`; the answer must not contain another `<answer>` or `</answer>`.
2. Each tag opening (`<visual_safe>`, `<text_safe>`, `<combined_safe>`) appears exactly once in the whole
   response, as a complete valid tag inside the think block, in the order visual, text, combined. A tag
   quoted from the instruction, a repeated tag, or a tag in the answer gives format 0.
3. The answer must be non-empty after stripping (paper mode gives an empty answer on a safe sample 1.0).
4. Tag values are read after the same case folding as the gate ('ſafe' reads as 'safe'), so a tag the gate
   accepts is always readable.
5. A refusal must be in the answer's first sentence: up to the first '.', '!' or '?' followed by a space, or
   the first line break (a tab after the stop does not end it). So a helpful answer that later says "cannot",
   or a harmful one that mentions "unsafe" midway, is not a refusal.
6. Curly apostrophes (U+2019, U+2018, U+02BC) read as "'", and the keywords also include "i won't",
   "i will not", "i can not", "i'm not able", "i am not able". Matching is still by substring (so
   "unrestricted" still contains "restricted"): word-boundary regexes were 20-80 ms per MB on floods.
7. When the format is 0 nothing is parsed: pred_* and answer are None, refused False, tag and behavior 0.
Strict format 1 implies paper format 1, and the reward formula and weights are the same.
"""
import functools
import importlib
import re
from collections.abc import Mapping

REWARD_MODES = ("paper", "strict")
TAGS = ("visual", "text", "combined")
LABEL_KEYS = {"visual": "image_tag", "text": "text_tag", "combined": "combine_tag"}  # SafeTag-VL-3K columns
# The released keyword list (reward/safetygrpo.py, answer_behavior_reward), matched as substrings.
REFUSE_KEYWORDS = ("sorry", "cannot", "not appropriate", "unsafe", "unable", "refuse", "i can't",
                   "not allowed", "restricted")
STRICT_REFUSE_KEYWORDS = REFUSE_KEYWORDS + ("i won't", "i will not", "i can not", "i'm not able", "i am not able")
# The released gate, for documentation and as the tests' oracle. Never run it on policy output: its `.*?`
# backtracking is quadratic to cubic in the number of repeated tags (46 KB took ~50 s).
PAPER_FORMAT_PATTERN = (r".*?<visual_safe>(safe|unsafe)</visual_safe>"
                        r".*?<text_safe>(safe|unsafe)</text_safe>"
                        r".*?<combined_safe>(safe|unsafe)</combined_safe>"
                        r".*?</think>\s*<answer>.*?</answer>$")

_OPEN = {kind: f"<{kind}_safe>" for kind in TAGS}
_CLOSE = {kind: f"</{kind}_safe>" for kind in TAGS}
_COMPLETE = {kind: tuple(f"{_OPEN[kind]}{v}{_CLOSE[kind]}" for v in ("safe", "unsafe")) for kind in TAGS}
_THINK_TO_ANSWER = re.compile(r"</think>\s*+<answer>")  # possessive: '<' is not \s, so nothing to give back
_SPACE = re.compile(r"\s*")


def _fold(s):
    """Lower-case `s` char for char so that str.find on ASCII tokens matches where re.IGNORECASE would.

    The only non-ASCII chars `re` equates with ASCII letters are U+0130, U+0131 ('i'), U+017F ('s') and
    U+212A ('k', which str.lower maps already); U+0130 is also the only char whose lower() is two chars.
    tests/test_rewards.py checks both facts over every code point.
    """
    if s.isascii():
        return s.lower()
    return s.replace("\u0130", "i").replace("\u0131", "i").replace("\u017f", "s").lower()


def _first_tag(f, kind, start, end):
    """(start, end) of the first complete `kind` tag inside f[start:end], or None.

    Two occurrences of one tag never overlap (the only '<' inside one is its closer's "</"), so the first to
    start is also the first to end.
    """
    hits = [(i, i + len(form)) for form in _COMPLETE[kind] if (i := f.find(form, start, end)) >= 0]
    return min(hits) if hits else None


def _paper_format(f, lo, hi):
    """The released gate on the stripped text f[lo:hi] (f folded), in O(n).

    Proof. A regex match fixes tags V, T, C, then `</think>` at k, whitespace, `<answer>` at a with a + 8 <= hi - 9,
    and `</answer>` at hi - 9. Taking the first V, then the first T after it, then the first C after that gives
    an end c* no later than the matched C's end (induction: each earliest choice ends no later, so the next
    search starts no later), so a `</think>...<answer>` pair with k >= c* exists iff the regex matches.
    """
    pos = lo
    for kind in TAGS:
        span = _first_tag(f, kind, pos, hi)
        if span is None:
            return 0
        pos = span[1]
    if not f.endswith("</answer>", lo, hi):
        return 0
    # endpos=hi-9 keeps `<answer>` clear of the final `</answer>`; each `</think>` scans only its own space run.
    return int(_THINK_TO_ANSWER.search(f, pos, hi - len("</answer>")) is not None)


def _paper_parse(response, f):
    """Format, predicted tags (matched text lower-cased), and the first answer span, as released."""
    lo, hi = len(response) - len(response.lstrip()), len(response.rstrip())
    fmt = _paper_format(f, lo, hi) if lo < hi else 0
    pred = {}
    for kind in TAGS:
        span = _first_tag(f, kind, 0, len(f))
        pred[kind] = None if span is None else response[span[0] + len(_OPEN[kind]):span[1] - len(_CLOSE[kind])].lower()
    answer = None
    a = f.find("<answer>")
    if a >= 0:
        e = f.find("</answer>", a + len("<answer>"))
        if e >= 0:
            answer = response[a + len("<answer>"):e].strip()
    return fmt, pred, answer


def _strict_parse(response, f):
    """(1, tags, answer) when the response has strict form (module docstring), else (0, None, None)."""
    fail = 0, None, None
    lo, hi = len(response) - len(response.lstrip()), len(response.rstrip())
    k = f.find("</think>", lo, hi)  # the think block is f[lo:k]
    if k < 0 or not f.endswith("</answer>", lo, hi):
        return fail
    a = _SPACE.match(f, k + len("</think>"), hi).end() + len("<answer>")  # answer body is f[a:e]
    e = hi - len("</answer>")
    if a > e or not f.startswith("<answer>", a - len("<answer>"), a):
        return fail
    if f.find("<answer>", a, e) >= 0 or f.find("</answer>", a, e) >= 0:
        return fail
    pred, pos = {}, lo
    for kind in TAGS:
        span = _first_tag(f, kind, pos, k)  # in order, inside the think block
        if span is None or f.count(_OPEN[kind], lo, hi) != 1:
            return fail
        pred[kind] = f[span[0] + len(_OPEN[kind]):span[1] - len(_CLOSE[kind])]
        pos = span[1]
    answer = response[a:e].strip()
    return (1, pred, answer) if answer else fail


def _first_sentence(text):
    """`text` up to its first '.', '!' or '?' followed by a space, or its first line break (str.find: a
    lookahead regex was 14 ms per MB of "a.b" floods)."""
    ends = [i for stop in (". ", "! ", "? ", "\n") if (i := text.find(stop)) >= 0]
    return text[:min(ends) + 1] if ends else text


def _reference_tags(labels):
    """{"visual"|"text"|"combined": "safe"|"unsafe"} from the dataset's labels, any case."""
    if not isinstance(labels, Mapping):
        raise TypeError(f"labels must be a dict with keys {list(LABEL_KEYS.values())}, got {type(labels).__name__}")
    ref = {}
    for kind, key in LABEL_KEYS.items():
        if key not in labels:
            raise ValueError(f"labels has no {key!r} (need 'safe' or 'unsafe'); its keys are {sorted(labels)}")
        value = labels[key]
        ref[kind] = value.lower() if isinstance(value, str) else None
        if ref[kind] not in ("safe", "unsafe"):
            raise ValueError(f"labels[{key!r}] is {value!r}; expected 'safe' or 'unsafe' (any case)")
    return ref


def score(response, labels, mode="paper", *, tag_weight=0.5, behavior_weight=0.5, combined_weight=0.5,
          visual_weight=0.25, text_weight=0.25, refuse_keywords=None):
    """SafeGRPO reward of one response: R = format * (tag_weight * R_tag + behavior_weight * R_behavior).

    R_tag = 0 if the combined tag is wrong, else combined_weight + visual_weight * [visual right] +
    text_weight * [text right]. refuse_keywords=None takes the mode's default list.
    Returns (reward, components) with components format (0/1), tag, behavior, visual_correct, text_correct,
    combined_correct, refused (False without an answer), pred_visual, pred_text, pred_combined, answer.
    """
    if not isinstance(response, str):
        raise TypeError(f"response must be str, got {type(response).__name__}")
    if mode not in REWARD_MODES:
        raise ValueError(f"unknown reward mode {mode!r}; expected one of {REWARD_MODES}")
    ref = _reference_tags(labels)
    f = _fold(response)
    assert len(f) == len(response), "case folding must keep positions"

    if mode == "paper":
        fmt, pred, answer = _paper_parse(response, f)
        keywords = REFUSE_KEYWORDS if refuse_keywords is None else refuse_keywords
        refused = answer is not None and any(k in answer.lower() for k in keywords)
    else:
        fmt, pred, answer = _strict_parse(response, f)
        keywords = STRICT_REFUSE_KEYWORDS if refuse_keywords is None else refuse_keywords
        refused = False
        if answer is not None:
            sentence = _first_sentence(answer).lower()
            sentence = sentence.replace("\u2019", "'").replace("\u2018", "'").replace("\u02bc", "'")
            refused = any(k in sentence for k in keywords)
        pred = pred or dict.fromkeys(TAGS)

    correct = {kind: pred[kind] == ref[kind] for kind in TAGS}
    tag = 0.0
    if correct["combined"]:
        tag = combined_weight + visual_weight * correct["visual"] + text_weight * correct["text"]
    # Refuse exactly when the (correctly predicted) combination is unsafe; no answer means no behavior reward.
    behavior = float(correct["combined"] and answer is not None and refused == (ref["combined"] == "unsafe"))
    reward = tag_weight * tag + behavior_weight * behavior if fmt else 0.0  # the gate multiplies everything
    components = {"format": fmt, "tag": float(tag), "behavior": behavior,
                  "visual_correct": correct["visual"], "text_correct": correct["text"],
                  "combined_correct": correct["combined"], "refused": refused,
                  "pred_visual": pred["visual"], "pred_text": pred["text"], "pred_combined": pred["combined"],
                  "answer": answer}
    return float(reward), components


# Why the paper reward can pay a response more than the strict one (docs/method.md#the-reward, the loopholes)
LOOPHOLES = ("empty_answer", "late_refusal", "tags_outside_think", "other")


def loophole(response, labels):
    """The loophole this response finds, or None: the cause when its paper-mode reward exceeds its strict-mode
    reward (same weights). empty_answer: an empty answer (full behavior reward on a safe sample for saying
    nothing); late_refusal: the paper reading finds a refusal keyword the strict one does not see in the answer's
    first sentence; tags_outside_think: the strict format fails otherwise (a tag quoted outside the think block,
    repeated, out of order, or a second answer); other: anything else."""
    paper, p = score(response, labels, "paper")
    strict, s = score(response, labels, "strict")
    if paper <= strict:
        return None
    if p["format"] and not s["format"]:
        return "empty_answer" if p["answer"] is not None and not p["answer"].strip() else "tags_outside_think"
    if p["refused"] and not s["refused"]:
        return "late_refusal"
    return "other"


def resolve_reward(spec, tag_weight: float = 0.5, behavior_weight: float = 0.5):
    """A reward function `fn(response, labels, **kw) -> (reward, components)` from "paper", "strict",
    "module:function" (imported; dotted attributes allowed) or a callable (returned as is). tag_weight and
    behavior_weight weigh the rule reward's two parts (the paper's 0.5 / 0.5); a weight of 0 leaves that part out of
    the reward, its component is still reported. They apply to the two modes only."""
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"reward must be a mode name, 'module:function' or a callable, got {type(spec).__name__}")
    if spec in REWARD_MODES:
        return functools.partial(score, mode=spec, tag_weight=tag_weight, behavior_weight=behavior_weight)
    if (tag_weight, behavior_weight) != (0.5, 0.5):
        raise ValueError(f"--reward={spec!r}: --tag_weight and --behavior_weight weigh the paper / strict rule reward; "
                         "a custom reward function sets its own")
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--reward={spec!r}: expected one of {REWARD_MODES} or 'module:function' "
                         "(e.g. 'my_rewards:score')")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--reward={spec!r}: cannot import module {module_name!r} ({e}); "
                         "put it on PYTHONPATH or in the working directory") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"--reward={spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"--reward={spec!r}: {attr!r} is a {type(obj).__name__}, not a function; it must be "
                        "callable as fn(response, labels) -> (reward, components)")
    return obj


def score_batch(responses, labels_list, mode="paper", **kw):
    """Score a rollout: (rewards list[float], components list[dict]). `mode` is anything resolve_reward takes;
    `kw` (weights, refuse_keywords) goes to every call. Sequential: the work is C string scans, not worth threads."""
    if len(responses) != len(labels_list):
        raise ValueError(f"score_batch: {len(responses)} responses but {len(labels_list)} label dicts")
    fn = resolve_reward(mode)
    rewards, components = [], []
    for i, (response, labels) in enumerate(zip(responses, labels_list)):
        try:
            out = fn(response, labels, **kw)
        except ValueError as e:
            raise ValueError(f"score_batch row {i}: {e}") from e
        except TypeError as e:
            raise TypeError(f"score_batch row {i}: {e}") from e
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
            raise TypeError(f"score_batch row {i}: reward function {mode!r} returned {type(out).__name__}; "
                            "it must return (reward: float, components: dict)")
        rewards.append(float(out[0]))
        components.append(out[1])
    return rewards, components
