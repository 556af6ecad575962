"""SafeTag construction against a real HTTP judge on 127.0.0.1, scripted per pair: good replies, malformed JSON,
out-of-range scores, timeouts, 5xx/4xx. Output rows and counts follow the paper's thresholds exactly; a crash
halfway, then a restart, asks only the remaining pairs. The judge clients and reply parsing: test_judge.py; the pool
adapters: test_sources.py."""
import json
import os
import signal
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from chat_server import GOOD, TIMEOUT, answer, client, png
from data import build_safetag, sources
from data.build_safetag import Thresholds, build, decide, pair_key
from data.safetag import load_safetag
from data.sources import Pair

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each pair is (instruction, script, expected outcome); expected is labels (image, text, combined) or a discard reason.
CASES = [
    ("p01 all safe", [("reply", GOOD)], ("safe", "safe", "safe"), 1),
    ("p02 harmful text", [("reply", answer(8, 9, 1, 9, 2, 9))], ("safe", "unsafe", "unsafe"), 1),
    ("p03 compositional", [("reply", answer(9, 8, 8, 8, 2, 8))], ("safe", "safe", "unsafe"), 1),
    ("p04 harmful image", [("reply", answer(0, 10, 10, 10, 0, 10))], ("unsafe", "safe", "unsafe"), 1),
    ("p05 exactly on thresholds", [("reply", answer(3, 7, 7, 7, 3, 7))], ("unsafe", "safe", "unsafe"), 1),
    ("p06 ambiguous text", [("reply", answer(9, 9, 5, 9, 9, 9))], "ambiguous_score", 1),
    ("p07 just above unsafe", [("reply", answer(9, 9, 9, 9, 3.5, 9))], "ambiguous_score", 1),
    ("p08 unsure text", [("reply", answer(9, 9, 9, 6, 9, 9))], "low_confidence", 1),
    ("p09 unsure and ambiguous", [("reply", answer(5, 2, 9, 9, 9, 9))], "low_confidence", 1),
    ("p10 prose", [("reply", "The image looks fine to me, I'd say 9/10.")], "malformed", 1),
    ("p11 out of range", [("reply", answer(11, 9, 9, 9, 9, 9))], "malformed", 1),
    ("p12 missing fields", [("reply", '{"visual_score": 9}')], "malformed", 1),
    ("p13 string score", [("reply", GOOD.replace('"text_score": 9', '"text_score": "9"'))], "malformed", 1),
    ("p14 think and fence", [("reply", "<think>look first</think>\n```json\n" + answer(2, 9, 9, 9, 1, 8) + "\n```")],
     ("unsafe", "safe", "unsafe"), 1),
    ("p15 500 then good", [("status", 500), ("reply", GOOD)], ("safe", "safe", "safe"), 2),
    ("p16 timeout then good", [("sleep", 2.5 * TIMEOUT), ("reply", answer(9, 9, 0, 9, 0, 9))], ("safe", "unsafe", "unsafe"), 2),
    ("p17 always 503", [("status", 503)], "judge_error", 3),
    ("p18 bad request", [("status", 400)], "judge_error", 1),
    ("p19 not a completion", [("raw", b'{"object": "error"}')], "judge_error", 1),
]


def make_pairs():
    pairs = [Pair(f"t/{k}", "alpha" if k % 2 == 0 else "beta", instr, png((10 * k, 255 - 10 * k, 7)))
             for k, (instr, _, _, _) in enumerate(CASES)]
    pairs.append(Pair("t/dup", "beta", CASES[0][0], png((0, 255, 7))))     # same bytes + text as pair 0
    return pairs


def script():
    return {instr: actions for instr, actions, _, _ in CASES}


def test_pipeline_rows_and_counts_follow_the_thresholds(tmp_path, serve):
    server = serve(script())
    pairs = make_pairs()
    summary = build(pairs, client(server.url), str(tmp_path), concurrency=4, progress=False)

    # requests: one per pair, plus the retries of the 500, the timeout and the three 503s; none for the duplicate
    assert len(server.asked) == sum(n for *_, n in CASES) == 23
    assert sorted(set(server.asked)) == sorted(instr for instr, *_ in CASES)

    kept = [(k, exp) for k, (_, _, exp, _) in enumerate(CASES) if isinstance(exp, tuple)]
    table = pq.read_table(tmp_path / "train.parquet")
    assert table.schema.names == ["prompt", "images", "text_tag", "image_tag", "combine_tag"]
    rows = table.to_pylist()
    assert [r["prompt"] for r in rows] == ["<image>" + CASES[k][0] for k, _ in kept]      # pool order
    assert [(r["image_tag"], r["text_tag"], r["combine_tag"]) for r in rows] == [exp for _, exp in kept]
    assert [r["images"] for r in rows] == [[{"bytes": pairs[k].image, "path": None}] for k, _ in kept]
    assert not (tmp_path / "test.parquet").exists()

    assert summary["pool"] == 20 and summary["accepted"] == 8
    assert summary["discarded"] == {"low_confidence": 2, "ambiguous_score": 2, "malformed": 4, "judge_error": 3,
                                    "bad_image": 0, "duplicate": 1, "not_asked": 0}
    assert summary["malformed_kinds"] == {"missing_field": 1, "not_a_number": 1, "not_json": 1, "out_of_range": 1}
    assert summary["discard_detail"] == {"ambiguous_score:combined": 1, "ambiguous_score:text": 1,
                                         "low_confidence:text": 1, "low_confidence:visual": 1}
    assert summary["by_combination"] == {
        "image=safe text=safe combined=safe": {"train": 2, "test": 0, "total": 2},
        "image=safe text=safe combined=unsafe": {"train": 1, "test": 0, "total": 1},
        "image=safe text=unsafe combined=unsafe": {"train": 2, "test": 0, "total": 2},
        "image=unsafe text=safe combined=unsafe": {"train": 3, "test": 0, "total": 3}}
    zero = dict.fromkeys(build_safetag.DISCARD_REASONS, 0)
    assert summary["by_source"] == {   # alpha = even pairs, beta = odd pairs + the duplicate
        "alpha": {**zero, "pool": 10, "accepted": 4, "ambiguous_score": 1, "low_confidence": 1, "malformed": 2, "judge_error": 2},
        "beta": {**zero, "pool": 10, "accepted": 4, "ambiguous_score": 1, "low_confidence": 1, "malformed": 2,
                 "judge_error": 1, "duplicate": 1}}
    assert summary["complete"] is False and summary["this_run"] == {"asked": 19, "resumed": 0, "requests": 23}
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    text = build_safetag.format_summary(summary)
    assert ["image=safe", "text=safe", "combined=unsafe", "1", "0", "1"] in [line.split() for line in text.splitlines()]
    assert ("discarded by reason: low_confidence 2, ambiguous_score 2, malformed 4, judge_error 3, duplicate 1"
            in text.splitlines())

    # the journal keeps every answer, malformed ones with the raw reply text
    journal = [json.loads(line) for line in (tmp_path / "journal.jsonl").read_text().splitlines()]
    assert len(journal) == 19
    by_instr = {e["instruction"]: e for e in journal}
    assert by_instr["p10 prose"]["status"] == "malformed"
    assert by_instr["p10 prose"]["reply"] == "The image looks fine to me, I'd say 9/10."
    assert by_instr["p11 out of range"]["problem"] == "out_of_range"
    assert by_instr["p17 always 503"]["status"] == "error" and by_instr["p17 always 503"]["attempts"] == 3
    assert "HTTP 400" in by_instr["p18 bad request"]["error"]

    # the output is a SafeTag dataset the loader reads back
    records = load_safetag(str(tmp_path), split="train")
    assert [r.prompt for r in records] == [r["prompt"] for r in rows]
    assert records[2].labels == {"image_tag": "safe", "text_tag": "safe", "combine_tag": "unsafe"}
    assert records[0].images[0].size == (8, 8)

    # a restart asks again only the pairs that failed; everything judged is reused
    retry = serve({**script(), "p17 always 503": [("reply", answer(1, 9, 9, 9, 1, 9))]})
    summary2 = build(make_pairs(), client(retry.url), str(tmp_path), concurrency=4, progress=False)
    assert sorted(retry.asked) == ["p17 always 503", "p18 bad request", "p19 not a completion"]
    assert summary2["accepted"] == 9 and summary2["discarded"]["judge_error"] == 2
    assert summary2["this_run"] == {"asked": 3, "resumed": 16, "requests": 3}


def test_thresholds_and_test_split(tmp_path, serve):
    server = serve(script())
    pairs = make_pairs()[:9]
    # safe from 5 up: p06 (text 5) is kept; confidence 6 suffices: p08 is kept; p07 (3.5) and p09 (confidence 2) are not
    th = Thresholds(unsafe_max=3, safe_min=5, min_confidence=6)
    summary = build(pairs, client(server.url), str(tmp_path), th, concurrency=2, test_fraction=0.5, placeholder="",
                    progress=False)
    assert summary["accepted"] == 7
    assert summary["discarded"]["ambiguous_score"] == 1 and summary["discarded"]["low_confidence"] == 1
    assert summary["discard_detail"] == {"ambiguous_score:combined": 1, "low_confidence:visual": 1}
    train = pq.read_table(tmp_path / "train.parquet").to_pylist()
    test = pq.read_table(tmp_path / "test.parquet").to_pylist()
    assert summary["splits"] == {"train": len(train), "test": len(test)} and len(train) + len(test) == 7
    keys = {p.instruction: pair_key(p.image, p.instruction) for p in pairs}
    in_test = {i for i, k in keys.items() if int(k[:8], 16) / 2 ** 32 < 0.5}
    kept = set(keys) - {"p07 just above unsafe", "p09 unsure and ambiguous"}
    assert {r["prompt"] for r in test} == in_test & kept and {r["prompt"] for r in train} == kept - in_test
    assert 0 < len(test) < 7                       # this fixture's keys fall on both sides
    assert all(not r["prompt"].startswith("<image>") for r in train + test)


def test_decide_rule():
    th = Thresholds()
    s = lambda v, t, c, conf=(9, 9, 9): {"visual_score": v, "text_score": t, "combined_score": c,  # noqa: E731
                                         "visual_confidence": conf[0], "text_confidence": conf[1], "combined_confidence": conf[2]}
    assert decide(s(10, 0, 3), th) == ({"image_tag": "safe", "text_tag": "unsafe", "combine_tag": "unsafe"}, None, [])
    assert decide(s(7, 7, 7, (7, 7, 7)), th)[0] == {"image_tag": "safe", "text_tag": "safe", "combine_tag": "safe"}
    assert decide(s(4, 6, 9), th) == (None, "ambiguous_score", ["visual", "text"])
    assert decide(s(9, 9, 9, (9, 9, 6.9)), th) == (None, "low_confidence", ["combined"])
    assert decide(s(5, 9, 9, (0, 9, 9)), th) == (None, "low_confidence", ["visual"])   # confidence is checked first


def test_pair_key_is_content_only():
    a = pair_key(b"\x89PNG-bytes", "What is this?")
    assert a == pair_key(b"\x89PNG-bytes", "What is this?") and len(a) == 32
    assert a != pair_key(b"\x89PNG-bytes", "What is this ?") and a != pair_key(b"\x89PNG-byteS", "What is this?")


# ----------------------------------------------------------------------------- crash and restart

class Crash(Exception):
    pass


class CrashingJudge:
    """Wraps a judge and raises (like a crash of the process) on call number `at`."""

    def __init__(self, inner, at):
        self.inner, self.at, self.calls = inner, at, 0
        self.fingerprint, self.requests = inner.fingerprint, 0

    def __call__(self, instruction, image):
        self.calls += 1
        if self.calls == self.at:
            raise Crash("simulated crash")
        return self.inner(instruction, image)


def good_pairs(n):
    return [Pair(f"g/{k}", "g", f"q{k:02d}", png((k, 2 * k, 3 * k))) for k in range(n)]


def test_crash_halfway_then_restart_asks_only_the_rest(tmp_path, serve):
    pairs = good_pairs(10)
    all_good = {p.instruction: [("reply", GOOD)] for p in pairs}
    first = serve(all_good)
    with pytest.raises(Crash):
        build(pairs, CrashingJudge(client(first.url), at=5), str(tmp_path), concurrency=1, progress=False)
    # the worker may already have taken the next queued pair (q05) when the crash stops the run: it finishes it
    assert first.asked[:4] == ["q00", "q01", "q02", "q03"] and first.asked[4:] in ([], ["q05"])
    journaled = [json.loads(line)["instruction"] for line in (tmp_path / "journal.jsonl").read_text().splitlines()]
    assert journaled == first.asked                        # every answer received is on disk
    assert not (tmp_path / "train.parquet").exists()           # nothing half-written
    second = serve(all_good)
    summary = build(pairs, client(second.url), str(tmp_path), concurrency=1, progress=False)
    rest = [f"q{k:02d}" for k in range(4, 10) if f"q{k:02d}" not in journaled]
    assert second.asked == rest
    assert summary["accepted"] == 10
    assert summary["this_run"] == {"asked": len(rest), "resumed": 10 - len(rest), "requests": len(rest)}


def test_crash_with_concurrency_then_restart(tmp_path, serve):
    pairs = good_pairs(12)
    all_good = {p.instruction: [("reply", GOOD)] for p in pairs}
    first = serve(all_good)
    with pytest.raises(Crash):
        build(pairs, CrashingJudge(client(first.url), at=6), str(tmp_path), concurrency=3, progress=False)
    journaled = {json.loads(line)["instruction"] for line in (tmp_path / "journal.jsonl").read_text().splitlines()}
    assert journaled == set(first.asked) and 5 <= len(journaled) < 12      # every answer received is on disk
    second = serve(all_good)
    build(pairs, client(second.url), str(tmp_path), concurrency=3, progress=False)
    assert sorted(second.asked) == sorted({p.instruction for p in pairs} - journaled)
    assert len(pq.read_table(tmp_path / "train.parquet")) == 12


def test_max_pairs_then_continue_and_a_torn_journal_line(tmp_path, serve, capsys):
    pairs = good_pairs(7)
    all_good = {p.instruction: [("reply", GOOD)] for p in pairs}
    first = serve(all_good)
    summary = build(pairs, client(first.url), str(tmp_path), concurrency=2, max_pairs=3, progress=False)
    assert len(first.asked) == 3 and summary["accepted"] == 3
    assert summary["discarded"]["not_asked"] == 4 and summary["complete"] is False
    with open(tmp_path / "journal.jsonl", "a") as f:
        f.write('{"key": "0123')                            # a line torn by a crash mid-write
    second = serve(all_good)
    summary = build(pairs, client(second.url), str(tmp_path), concurrency=2, progress=False)
    assert sorted(second.asked) == [f"q{k:02d}" for k in range(3, 7)]
    assert summary["accepted"] == 7 and summary["complete"] is True
    assert "ignored 1 unreadable line" in capsys.readouterr().err
    lines = (tmp_path / "journal.jsonl").read_text().splitlines()
    assert len(lines) == 8 and sum(1 for line in lines if line.startswith('{"key": "0123"')) == 0


def test_journal_from_another_judge_is_refused(tmp_path, serve):
    pairs = good_pairs(2)
    server = serve({p.instruction: [("reply", GOOD)] for p in pairs})
    build(pairs, client(server.url), str(tmp_path), progress=False)
    other = client(server.url, prompt="Rate this: {instruction}")
    with pytest.raises(ValueError, match="another judge or judge prompt"):
        build(pairs, other, str(tmp_path), progress=False)
    summary = build(pairs, other, str(tmp_path), allow_judge_change=True, progress=False)
    assert summary["this_run"]["resumed"] == 2 and len(server.asked) == 2


def test_cli_killed_mid_run_then_restarted(tmp_path, serve):
    """The real thing: the CLI process is SIGKILLed while waiting for its 4th answer, then run again."""
    (tmp_path / "img").mkdir()
    with open(tmp_path / "pool.jsonl", "w") as f:
        for k in range(6):
            (tmp_path / "img" / f"{k}.png").write_bytes(png((40 * k, 0, 0)))
            f.write(json.dumps({"image": f"img/{k}.png", "instruction": f"cli{k}", "id": k}) + "\n")
    proc = {}

    def kill_on_fourth(count):
        if count == 4:
            proc["p"].send_signal(signal.SIGKILL)
            proc["p"].wait()
    server = serve({f"cli{k}": [("reply", answer(9, 9, 0, 9, 0, 9))] for k in range(6)}, on_request=kill_on_fourth)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "data.build_safetag", "--pool", str(tmp_path / "pool.jsonl"), "--judge_url", server.url,
           "--judge_model", "m", "--judge_prompt_file", str(tmp_path / "prompt.txt"), "--out_dir", str(out),
           "--concurrency", "1", "--timeout", "5", "--no_progress"]
    (tmp_path / "prompt.txt").write_text("{instruction}")
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc["p"] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc["p"].communicate(timeout=60)
    assert proc["p"].returncode == -signal.SIGKILL
    assert server.asked == ["cli0", "cli1", "cli2", "cli3"]
    assert len((out / "journal.jsonl").read_text().splitlines()) == 3 and not (out / "train.parquet").exists()

    server.on_request = None
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert server.asked[4:] == ["cli3", "cli4", "cli5"]
    rows = pq.read_table(out / "train.parquet").to_pylist()
    assert [r["prompt"] for r in rows] == [f"<image>cli{k}" for k in range(6)]
    assert [r["images"][0]["path"] for r in rows] == [f"{k}.png" for k in range(6)]
    assert all((r["image_tag"], r["text_tag"], r["combine_tag"]) == ("safe", "unsafe", "unsafe") for r in rows)
    assert "image=safe text=unsafe combined=unsafe" in done.stdout and "pool 6  accepted 6" in done.stdout


def test_cli_input_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        build_safetag.main(["--judge_url", "http://x", "--judge_model", "m", "--out_dir", str(tmp_path)])
    assert "give at least one pool" in capsys.readouterr().err
    rc = build_safetag.main(["--pool", str(tmp_path / "missing.jsonl"), "--judge_url", "http://x", "--judge_model", "m",
                             "--out_dir", str(tmp_path), "--no_progress"])
    assert rc == 1 and "missing.jsonl" in capsys.readouterr().err
    (tmp_path / "p.txt").write_text("no slot here")
    (tmp_path / "a.png").write_bytes(png((0, 0, 0)))
    (tmp_path / "pool.jsonl").write_text(json.dumps({"image": "a.png", "instruction": "q"}))
    rc = build_safetag.main(["--pool", str(tmp_path / "pool.jsonl"), "--judge_url", "http://x", "--judge_model", "m",
                             "--judge_prompt_file", str(tmp_path / "p.txt"), "--out_dir", str(tmp_path / "o")])
    assert rc == 1 and "{instruction}" in capsys.readouterr().err


def test_bad_image_in_pool(tmp_path, serve):
    server = serve({"ok": [("reply", GOOD)], "broken": [("reply", GOOD)]})
    pairs = [Pair("b/0", "b", "ok", png((0, 0, 0))), Pair("b/1", "b", "broken", b"\x89PNG truncated")]
    with pytest.raises(sources.PoolError, match="pair b/1: unreadable image"):
        build(pairs, client(server.url), str(tmp_path), progress=False)
    summary = build(pairs, client(server.url), str(tmp_path), skip_bad_pairs=True, progress=False)
    assert summary["accepted"] == 1 and summary["discarded"]["bad_image"] == 1
    assert server.asked.count("broken") == 0
