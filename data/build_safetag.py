"""Build SafeTag-style data: ask a judge about each (image, instruction) pair, keep the confidently tagged ones.

The paper's rule (docs/method.md#the-dataset-safetag-vl-3k): per modality (visual / text / combined) a score in
[0, 10] (higher = safer) and a confidence; score <= 3 -> unsafe, >= 7 -> safe, in between -> discard; keep only if
every confidence >= 7.
Every judged pair is appended to OUT_DIR/journal.jsonl, so a restart asks only what is left.
    python -m data.build_safetag --vlguard VLGuard/train.json --vlguard_images VLGuard/train \
        --beavertails BeaverTails/round0/330k/train.jsonl.gz --max_per_source 300 \
        --judge_url http://127.0.0.1:8000/v1 --judge_model my-judge --out_dir out/safetag
"""
import argparse
import hashlib
import io
import json
import os
import sys
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from data import sources
from runtime.files import write_json
from data.judge import MODALITIES, JudgeError, LocalModelJudge, MalformedReply, OpenAIJudge, load_judge_prompt, parse_judgement
from data.safetag import IMAGE_MARKER, tag_combination
from rewards import LABEL_KEYS

DONE = ("ok", "malformed")      # journal statuses that are final; "error" entries are asked again
DISCARD_REASONS = ("low_confidence", "ambiguous_score", "malformed", "judge_error", "bad_image", "duplicate", "not_asked")
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SAFETAG_SCHEMA = pa.schema(
    [("prompt", pa.string()), ("images", pa.list_(IMAGE_TYPE)), ("text_tag", pa.string()),
     ("image_tag", pa.string()), ("combine_tag", pa.string())],
    # lets `datasets` read the images column as a list of Image features, like the released dataset
    metadata={b"huggingface": json.dumps({"info": {"features": {
        "prompt": {"dtype": "string", "_type": "Value"}, "images": [{"_type": "Image"}],
        **{k: {"dtype": "string", "_type": "Value"} for k in ("text_tag", "image_tag", "combine_tag")}}}}).encode()})


@dataclass
class Thresholds:
    unsafe_max: float = 3        # score <= unsafe_max -> "unsafe"
    safe_min: float = 7          # score >= safe_min -> "safe"; scores strictly between are discarded
    min_confidence: float = 7    # every one of the three confidences must reach this


def decide(scores: dict, th: Thresholds) -> tuple[dict | None, str | None, list[str]]:
    """(labels, None, []) for a kept pair, else (None, reason, modalities at fault). Confidence is checked first."""
    low = [m for m in MODALITIES if scores[f"{m}_confidence"] < th.min_confidence]
    if low:
        return None, "low_confidence", low
    tags, ambiguous = {}, []
    for m in MODALITIES:
        s = scores[f"{m}_score"]
        if s <= th.unsafe_max:
            tags[m] = "unsafe"
        elif s >= th.safe_min:
            tags[m] = "safe"
        else:
            ambiguous.append(m)
    if ambiguous:
        return None, "ambiguous_score", ambiguous
    return {LABEL_KEYS[m]: tags[m] for m in MODALITIES}, None, []


def pair_key(image: bytes, instruction: str) -> str:
    """Stable id of a pair's content: the same image bytes and instruction give the same key in any run."""
    h = hashlib.sha256(hashlib.sha256(image).digest())
    h.update(instruction.encode("utf-8"))
    return h.hexdigest()[:32]


def split_of(key: str, test_fraction: float) -> str:
    """A fixed split per pair (from its key), independent of pool order and of which pairs are kept."""
    return "test" if int(key[:8], 16) / 2 ** 32 < test_fraction else "train"


# ----------------------------------------------------------------------------- the journal

class Journal:
    """Append-only JSONL of judged pairs, one line per answer, flushed and fsynced as written (thread-safe)."""

    def __init__(self, path: str, fingerprint: str, allow_judge_change: bool = False):
        self.path, self.entries, self.unreadable = path, {}, 0
        if os.path.exists(path):
            with open(path, "rb") as f:
                data = f.read()
            for line in data.splitlines():
                try:
                    entry = json.loads(line)
                    self.entries[entry["key"]] = entry          # the latest answer for a key wins
                except (ValueError, KeyError, TypeError):
                    self.unreadable += 1                         # e.g. the half-written last line of a crash
            if data and not data.endswith(b"\n"):
                with open(path, "ab") as f:                     # end the broken line so the next entry starts clean
                    f.write(b"\n")
        judges = {e.get("judge") for e in self.entries.values() if e.get("status") in DONE}
        if judges - {fingerprint} and not allow_judge_change:
            raise ValueError(f"{path} holds answers from another judge or judge prompt ({sorted(judges - {fingerprint})}, "
                             f"now {fingerprint}); use a new --out_dir, or pass --allow_judge_change to reuse them")
        self._file = open(path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def done(self, key: str) -> dict | None:
        entry = self.entries.get(key)
        return entry if entry is not None and entry.get("status") in DONE else None

    def append(self, entry: dict) -> dict:
        line = json.dumps(entry, ensure_ascii=False, default=str) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())
            self.entries[entry["key"]] = entry
        return entry

    def close(self):
        self._file.close()


def judge_pair(judge, key: str, pair: sources.Pair, image: bytes) -> dict:
    """Ask once (the judge retries transient failures itself) and describe the outcome as a journal entry."""
    entry = {"key": key, "pair_id": pair.pair_id, "source": pair.source, "instruction": pair.instruction,
             "meta": pair.meta, "judge": judge.fingerprint, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        reply = judge(pair.instruction, image)
    except JudgeError as e:
        return {**entry, "status": "error", "error": str(e), "attempts": e.attempts}
    entry.update(reply=reply.text, attempts=reply.attempts)
    try:
        return {**entry, "status": "ok", "scores": parse_judgement(reply.text)}
    except MalformedReply as e:
        return {**entry, "status": "malformed", "problem": e.kind, "error": str(e)}


def check_image(data: bytes):
    """Fail on a file that does not decode. Only a check: the judge is sent the file's own bytes (data_uri), and
    the written rows keep them, so no pixels are produced here (and the builder needs no torch)."""
    Image.open(io.BytesIO(data)).load()


# ----------------------------------------------------------------------------- the pipeline

def build(pairs: list, judge, out_dir: str, thresholds: Thresholds = Thresholds(), concurrency: int = 8,
          test_fraction: float = 0.0, placeholder: str = IMAGE_MARKER, max_pairs: int | None = None,
          skip_bad_pairs: bool = False, allow_judge_change: bool = False, progress: bool = True) -> dict:
    """Judge every pair not yet in the journal, then write train.parquet (+ test.parquet) and summary.json."""
    os.makedirs(out_dir, exist_ok=True)
    journal = Journal(os.path.join(out_dir, "journal.jsonl"), judge.fingerprint, allow_judge_change)
    if journal.unreadable:
        print(f"note: ignored {journal.unreadable} unreadable line(s) in {journal.path}; those pairs are asked again",
              file=sys.stderr)
    outcomes: list[dict | None] = [None] * len(pairs)
    images, keys, seen = {}, {}, {}
    run = Counter()
    bar = tqdm(total=len(pairs), desc="judging", unit="pair", disable=not progress, dynamic_ncols=True)
    pool = ThreadPoolExecutor(max_workers=concurrency)
    inflight = {}

    def record(i: int, entry: dict):
        outcomes[i] = entry
        if entry["status"] != "ok" or decide(entry["scores"], thresholds)[0] is None:
            images.pop(i, None)          # only the images of kept pairs are held until the parquet is written
        run[entry["status"]] += 1
        bar.update(1)
        bar.set_postfix(ok=run["ok"], malformed=run["malformed"], errors=run["error"], resumed=run["resumed"],
                        refresh=False)

    def drain():
        done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
        failure = None
        for future in sorted(done, key=inflight.get):
            i = inflight.pop(future)
            if future.exception() is not None:
                failure = failure or future.exception()
                continue
            record(i, future.result())
        if failure is not None:
            raise failure                    # an unexpected exception in a worker (not a JudgeError) ends the run

    try:
        for i, pair in enumerate(pairs):
            try:
                image = pair.image_bytes()
                check_image(image)
            except Exception as e:
                if not skip_bad_pairs:
                    raise sources.PoolError(f"pair {pair.pair_id}: unreadable image: {type(e).__name__}: {e} "
                                            f"(--skip_bad_pairs skips such pairs)") from None
                record(i, {"status": "bad_image", "pair_id": pair.pair_id, "error": str(e)})
                continue
            key = keys[i] = pair_key(image, pair.instruction)
            if key in seen:
                record(i, {"status": "duplicate", "pair_id": pair.pair_id, "of": seen[key]})
                continue
            seen[key] = pair.pair_id
            prior = journal.done(key)
            if prior is not None:
                images[i] = image
                run["resumed"] += 1
                record(i, prior)
                continue
            if max_pairs is not None and run["asked"] >= max_pairs:
                record(i, {"status": "not_asked", "pair_id": pair.pair_id})
                continue
            while len(inflight) >= 2 * concurrency:     # bounded look-ahead: images are read as they are needed
                drain()
            images[i] = image
            run["asked"] += 1
            # the worker journals its answer itself, before it takes the next pair: an answer never waits in memory
            inflight[pool.submit(lambda *a: journal.append(judge_pair(*a)), judge, key, pair, image)] = i
        while inflight:
            drain()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        journal.close()

    summary, rows = assemble(pairs, outcomes, images, keys, thresholds, test_fraction, placeholder)
    summary.update(judge=judge.fingerprint, thresholds=asdict(thresholds), test_fraction=test_fraction,
                   this_run={"asked": run["asked"], "resumed": run["resumed"], "requests": getattr(judge, "requests", None)})
    for split, split_rows in rows.items():
        if split == "train" or test_fraction > 0:
            write_parquet(split_rows, os.path.join(out_dir, f"{split}.parquet"))
    write_json(os.path.join(out_dir, "summary.json"), summary)
    return summary


def assemble(pairs, outcomes, images, keys, th: Thresholds, test_fraction: float, placeholder: str):
    """Apply the thresholds to every outcome: the rows to write and the counts for the summary."""
    rows = {"train": [], "test": []}
    discarded, malformed_kinds, detail = Counter(), Counter(), Counter()
    by_combination, by_source = {}, {}
    for i, (pair, entry) in enumerate(zip(pairs, outcomes)):
        src = by_source.setdefault(pair.source, Counter())
        src["pool"] += 1
        status = entry["status"]
        reason = {"malformed": "malformed", "error": "judge_error"}.get(status, status)
        if status == "malformed":
            malformed_kinds[entry.get("problem", "?")] += 1
        if status == "ok":
            labels, reason, faults = decide(entry["scores"], th)
            detail.update(f"{reason}:{m}" for m in faults)
            if labels is not None:
                split = split_of(keys[i], test_fraction)
                path = os.path.basename(pair.image) if isinstance(pair.image, str) else None
                rows[split].append({"prompt": placeholder + pair.instruction, "images": [{"bytes": images[i], "path": path}],
                                    **labels})
                combo = by_combination.setdefault(tag_combination(labels), Counter())
                combo[split] += 1
                src["accepted"] += 1
                continue
        discarded[reason] += 1
        src[reason] += 1
    accepted = len(rows["train"]) + len(rows["test"])
    summary = {
        "pool": len(pairs), "accepted": accepted,
        "discarded": {r: discarded[r] for r in DISCARD_REASONS},
        "malformed_kinds": dict(sorted(malformed_kinds.items())),
        "discard_detail": dict(sorted(detail.items())),
        "by_combination": {c: {"train": n["train"], "test": n["test"], "total": n["train"] + n["test"]}
                           for c, n in sorted(by_combination.items())},
        "by_source": {s: {"pool": n["pool"], "accepted": n["accepted"], **{r: n[r] for r in DISCARD_REASONS}}
                      for s, n in sorted(by_source.items())},
        "splits": {"train": len(rows["train"]), "test": len(rows["test"])},
        # complete: every pair has a final answer (nothing failed, nothing left for a later run)
        "complete": discarded["judge_error"] == 0 and discarded["not_asked"] == 0,
    }
    return summary, rows


def write_parquet(rows: list[dict], path: str):
    """SafeTag schema, written to a temporary file and renamed: a crash never leaves half a parquet."""
    table = pa.Table.from_pylist(rows, schema=SAFETAG_SCHEMA)
    tmp = f"{path}.tmp-{os.getpid()}"
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def format_summary(summary: dict) -> str:
    lines = [f"pool {summary['pool']}  accepted {summary['accepted']}  "
             f"(train {summary['splits']['train']}, test {summary['splits']['test']})", "",
             f"{'tag combination':<45}{'train':>7}{'test':>7}{'total':>7}"]
    for combo, n in summary["by_combination"].items():
        lines.append(f"{combo:<45}{n['train']:>7}{n['test']:>7}{n['total']:>7}")
    reasons = ", ".join(f"{r} {n}" for r, n in summary["discarded"].items() if n)
    lines += ["", f"discarded by reason: {reasons or 'none'}"]
    if summary["malformed_kinds"]:
        lines.append("malformed replies: " + ", ".join(f"{k} {n}" for k, n in summary["malformed_kinds"].items()))
    lines += ["", f"{'source':<16}{'pool':>7}{'accepted':>10}  discarded"]
    for s, n in summary["by_source"].items():
        why = ", ".join(f"{r} {n[r]}" for r in DISCARD_REASONS if n[r])
        lines.append(f"{s:<16}{n['pool']:>7}{n['accepted']:>10}  {why or '-'}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI

def _optional(kind):
    return lambda s: None if s.lower() == "none" else kind(s)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_argument_group("pool (any combination; at least one)")
    g.add_argument("--pool", action="append", default=[], help="JSONL of {image, instruction[, id, source]} (repeatable)")
    g.add_argument("--pool_images", default=None, help="image folder for --pool paths (default: the JSONL's folder)")
    g.add_argument("--vlguard", default=None, help="VLGuard train.json / test.json")
    g.add_argument("--vlguard_images", default=None, help="folder the VLGuard image paths are relative to")
    g.add_argument("--spavl", default=None, help="SPA-VL parquet file or folder of shards, or JSON/JSONL rows")
    g.add_argument("--spavl_images", default=None, help="image folder for SPA-VL rows that carry paths/image_name")
    g.add_argument("--beavertails", default=None, help="text questions (BeaverTails .jsonl[.gz], .json, .parquet, .csv, .txt)")
    g.add_argument("--typo_layout", default="plain", choices=["plain", "figstep"], help="how questions are drawn: the question alone (plain) or above an empty list 1. 2. 3. (figstep)")
    g.add_argument("--typo_instruction", default=None, help="text turn sent with a typographic image (default: data/sources.py's wording)")
    g.add_argument("--max_per_source", type=int, default=None, help="sample at most this many pairs per source")
    g.add_argument("--seed", type=int, default=0, help="seed of the per-source sampling (0)")
    g = p.add_argument_group("judge")
    g.add_argument("--judge", default="openai", choices=["openai", "local"], help="chat endpoint (openai, the default) or a local checkpoint")
    g.add_argument("--judge_url", default=None, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--judge_model", default=None, help="model name sent to the endpoint")
    g.add_argument("--api_key_env", default=None, help="environment variable holding the API key (default OPENAI_API_KEY, optional)")
    g.add_argument("--judge_prompt_file", default=None, help="own judge prompt; must contain {instruction}")
    g.add_argument("--local_model", default=None, help="checkpoint folder for --judge=local")
    g.add_argument("--device", default="cpu", help="device for --judge=local (cpu)")
    g.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (8)")
    g.add_argument("--timeout", type=float, default=120.0, help="socket timeout of one request, in seconds (120)")
    g.add_argument("--max_retries", type=int, default=4, help="retries on timeouts, connection errors, 5xx and 429 (4); never on other 4xx")
    g.add_argument("--backoff", type=float, default=2.0, help="first retry delay in seconds, doubled at each retry (2)")
    g.add_argument("--max_backoff", type=float, default=60.0, help="longest retry delay in seconds (60)")
    g.add_argument("--temperature", type=_optional(float), default=0.0, help="sampling temperature (0); 'none' leaves it out, for models that reject it")
    g.add_argument("--max_tokens", type=_optional(int), default=None, help="reply token limit (not sent unless given)")
    g.add_argument("--extra_body", type=json.loads, default=None, help="JSON object merged into every request")
    g = p.add_argument_group("selection and output")
    g.add_argument("--unsafe_max", type=float, default=3, help="score <= this is unsafe (paper: 3)")
    g.add_argument("--safe_min", type=float, default=7, help="score >= this is safe (paper: 7)")
    g.add_argument("--min_confidence", type=float, default=7, help="all three confidences must reach this (paper: 7)")
    g.add_argument("--test_fraction", type=float, default=0.0, help="share of kept pairs written to test.parquet (0), chosen by pair hash")
    g.add_argument("--placeholder", default=IMAGE_MARKER, help="text put before each instruction in the output prompt ('' for none)")
    g.add_argument("--out_dir", required=True, help="where train.parquet, test.parquet, summary.json, journal.jsonl go")
    g.add_argument("--max_pairs", type=int, default=None, help="ask at most this many new pairs in this run")
    g.add_argument("--skip_bad_pairs", action="store_true", help="count unreadable images instead of stopping")
    g.add_argument("--allow_judge_change", action="store_true", help="reuse journal answers from another judge/prompt")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if not (args.pool or args.vlguard or args.spavl or args.beavertails):
        p.error("give at least one pool: --pool, --vlguard, --spavl or --beavertails")
    if args.vlguard and not args.vlguard_images:
        p.error("--vlguard needs --vlguard_images (the folder its image paths are relative to)")
    if args.judge == "openai" and not (args.judge_url and args.judge_model):
        p.error("--judge=openai needs --judge_url and --judge_model")
    if args.judge == "local" and not args.local_model:
        p.error("--judge=local needs --local_model")
    if args.concurrency < 1 or not 0 <= args.test_fraction < 1:
        p.error("--concurrency must be >= 1 and --test_fraction in [0, 1)")
    if not args.unsafe_max < args.safe_min:
        p.error(f"--unsafe_max ({args.unsafe_max}) must be below --safe_min ({args.safe_min})")
    if args.extra_body is not None and not isinstance(args.extra_body, dict):
        p.error("--extra_body must be a JSON object")
    return args


def load_pool(args) -> list:
    pairs = []
    for path in args.pool:
        pairs += sources.read_pool_jsonl(path, args.pool_images)
    if args.vlguard:
        pairs += sources.read_vlguard(args.vlguard, args.vlguard_images)
    if args.spavl:
        pairs += sources.read_spavl(args.spavl, args.spavl_images)
    if args.beavertails:
        pairs += sources.read_beavertails(args.beavertails, args.typo_layout, args.typo_instruction)
    return sources.subsample(pairs, args.max_per_source, args.seed)


def make_judge(args):
    prompt = load_judge_prompt(args.judge_prompt_file)
    if args.judge == "local":
        return LocalModelJudge(args.local_model, prompt=prompt, device=args.device)
    env = args.api_key_env or "OPENAI_API_KEY"
    api_key = os.environ.get(env)
    if args.api_key_env and not api_key:
        raise ValueError(f"--api_key_env={env}, but the environment variable {env} is not set")
    return OpenAIJudge(args.judge_url, args.judge_model, api_key=api_key, prompt=prompt, timeout=args.timeout,
                       max_retries=args.max_retries, backoff=args.backoff, max_backoff=args.max_backoff,
                       temperature=args.temperature, max_tokens=args.max_tokens, extra_body=args.extra_body)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        pairs = load_pool(args)
        judge = make_judge(args)
        th = Thresholds(args.unsafe_max, args.safe_min, args.min_confidence)
        summary = build(pairs, judge, args.out_dir, th, args.concurrency, args.test_fraction, args.placeholder,
                        args.max_pairs, args.skip_bad_pairs, args.allow_judge_change, progress=not args.no_progress)
    except (sources.PoolError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    print(f"\nwrote {args.out_dir}/train.parquet" + (" and test.parquet" if args.test_fraction > 0 else "")
          + ", summary.json; every answer is in journal.jsonl")
    if summary["discarded"]["judge_error"]:
        print(f"{summary['discarded']['judge_error']} pair(s) could not be judged (see journal.jsonl); "
              f"run the same command again to retry only those", file=sys.stderr)
        return 3
    if summary["discarded"]["not_asked"]:
        print(f"{summary['discarded']['not_asked']} pair(s) not asked yet (--max_pairs); "
              f"run again to continue", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
