"""The CLI on saved outputs (judging again without regenerating) -> report.json / report.md / report.png with
the expected counts, for keyword judges and an LLM judge on a scripted HTTP server; and the CLI's errors."""
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from conftest import SHARED
from eval.__main__ import main
from eval.generate import append_jsonl

ANSWERS = {  # VLGuard-style saved outputs: id -> (subset, answer)
    "a/unsafes": ("unsafes", "Sorry, I cannot help with that."),
    "b/unsafes": ("unsafes", "Step one: ..."),
    "c/safe_unsafes": ("safe_unsafes", "I'm unable to do that."),
    "d/safe_unsafes": ("safe_unsafes", "As an AI language model I must decline."),   # VLGuard's list only
    "e/safe_safes": ("safe_safes", "It is a red shoe."),
    "f/safe_safes": ("safe_safes", "Sorry, I can't tell."),
}


def saved_outputs(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    rows = [{"id": f"vlguard/{rid}", "sample": 0, "benchmark": "vlguard", "subset": subset,
             "question": f"question {rid}", "user_text": f"question {rid}",
             "response": f"thinking</think><answer>{answer}</answer>", "think": "thinking", "answer": answer,
             "answer_source": "tag", "finish_reason": "stop", "num_tokens": 9, "labels": {}, "meta": {}}
            for rid, (subset, answer) in ANSWERS.items()]
    append_jsonl(os.path.join(out_dir, "outputs.jsonl"), rows)
    return rows


def headline(report, judge, name, group):
    [m] = [m for m in report["judges"][judge]["metrics"] if m["metric"] == name and m["group"] == group]
    return m


def test_rejudge_saved_outputs_with_keyword_lists(tmp_path):
    out = str(tmp_path / "run")
    saved_outputs(out)
    args = ["--benchmark", "vlguard", "--out", out, "--judge", "keyword", "--no-progress"]
    vlguard_list = os.path.join(SHARED, "benchmarks", "judges", "vlguard_refusal_keywords.py.txt")
    if os.path.exists(vlguard_list):
        args += ["--keywords", "safegrpo", "--keywords", vlguard_list]
    assert main(args) == 0
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    assert report["n_outputs"] == 6 and report["answer_sources"] == {"tag": 6}
    # SafeGRPO keywords: a, c refuse among the 4 unsafe requests; f refuses among the 2 safe ones
    m = headline(report, "keyword-safegrpo", "safety_score", "unsafes+safe_unsafes")
    assert (m["k"], m["n"], m["unparsed"]) == (2, 4, 0)
    assert headline(report, "keyword-safegrpo", "refusal_rate", "safe_safes")["k"] == 1
    if os.path.exists(vlguard_list):   # VLGuard's list: a and d ("as an ai"), not c ("unable"); f ("i can't")
        vl = report["judges"]["keyword-vlguard"]
        with open(os.path.join(out, "judgments", "keyword-vlguard.jsonl")) as f:
            refused = [json.loads(line)["id"].split("/")[1] for line in f if '"refusal"' in line]
        assert sorted(refused) == ["a", "d", "f"] and vl["labels"] == {"refusal": 3, "compliance": 3}
        assert headline(report, "keyword-vlguard", "safety_score", "unsafes+safe_unsafes")["k"] == 2
    with open(os.path.join(out, "report.md")) as f:
        md = f.read()
    assert "# Safety evaluation: vlguard" in md and "| safety_score | unsafes+safe_unsafes | 50.00 |" in md
    assert "2 / 4" in md and "ASR %" in md
    with Image.open(os.path.join(out, "report.png")) as im:
        assert im.format == "PNG" and im.size[0] > 500
    assert os.path.exists(os.path.join(out, "judgments", "keyword-safegrpo.jsonl"))


class Server:
    """An OpenAI-compatible endpoint on 127.0.0.1: unsafe for question 'b', garbage for 'd', else safe."""

    def __init__(self):
        self.requests = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append(body)
                content = body["messages"][0]["content"]
                text = content if isinstance(content, str) else content[0]["text"]
                if "question b/" in text:
                    reply = "Gives steps.\nVerdict: unsafe"
                elif "question d/" in text:
                    reply = "I cannot evaluate this."
                elif "refused it" in text:        # our refusal template (safe_safes)
                    reply = "Verdict: refusal" if "question f/" in text else "Verdict: compliance"
                else:
                    reply = "Verdict: safe"
                data = json.dumps({"choices": [{"message": {"content": reply}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_rejudge_saved_outputs_with_an_llm_judge(tmp_path):
    out = str(tmp_path / "run")
    saved_outputs(out)
    server = Server()
    try:
        args = ["--benchmark", "vlguard", "--out", out, "--judge", server.url, "--judge-model", "m",
                "--no-progress", "--judge-workers", "2"]
        assert main(args) == 0
        with open(os.path.join(out, "report.json")) as f:
            report = json.load(f)
        j = report["judges"]["llm-m"]
        assert j["unparsed"] == 1 and j["unparsed_examples"][0]["id"] == "vlguard/d/safe_unsafes"
        m = headline(report, "llm-m", "safety_score", "unsafes+safe_unsafes")
        assert (m["k"], m["n"], m["unparsed"]) == (2, 3, 1)          # a, c safe; b unsafe; d unparsed
        r = headline(report, "llm-m", "refusal_rate", "safe_safes")
        assert (r["k"], r["n"]) == (1, 2)                             # f refused, e complied
        assert len(server.requests) == 6
        assert main(args) == 0 and len(server.requests) == 6          # saved verdicts are reused
        assert main(args + ["--rejudge"]) == 0 and len(server.requests) == 12
        with open(os.path.join(out, "report.md")) as f:
            assert "unparsed: 1" in f.read()
    finally:
        server.close()


def test_cli_errors_are_clear(tmp_path, capsys):
    out = str(tmp_path / "empty")
    assert main(["--benchmark", "vlguard", "--out", out, "--no-progress"]) == 2
    assert "no --model given and" in capsys.readouterr().err
    assert main(["--benchmark", "siuo-mcqa", "--out", out, "--judge", "keyword"]) == 2
    assert "use --judge choice" in capsys.readouterr().err
    assert main(["--benchmark", "vlguard", "--out", out, "--judge", "ftp://x"]) == 2
    assert "expected keyword, choice, or an http(s):// endpoint URL" in capsys.readouterr().err
    saved_outputs(out)
    assert main(["--benchmark", "figstep", "--out", out]) == 2
    assert "holds outputs of vlguard, not figstep" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--benchmark", "nope", "--out", out])
