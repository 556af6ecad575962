"""data/judge.py: parsing a judge's reply (strict JSON, the reasons a reply is malformed), the OpenAI-compatible
HTTP client against a real server on 127.0.0.1 (what a request carries, which failures are retried), and the local
model judge's use of the sampler.
Run: .venv/bin/python -m pytest -q tests/test_judge.py
"""
import base64
import json
import sys

import pytest

from data import build_safetag, judge as judge_mod
from data.judge import JUDGE_PROMPT, JudgeError, MalformedReply, parse_judgement
from chat_server import GOOD, JudgeServer, client, png


def test_parse_judgement():
    assert parse_judgement(GOOD) == {f: 9 for f in judge_mod.FIELDS}
    assert parse_judgement('```json\n' + GOOD + '\n```')["text_score"] == 9
    assert parse_judgement('<think>{"visual_score": 1}</think>' + GOOD)["visual_score"] == 9
    assert parse_judgement(json.dumps({**json.loads(GOOD), "reason": "fine"}))["combined_confidence"] == 9
    for text, kind in [("", "empty"), ("9", "not_json"), ("[1, 2]", "not_json"), ("Sure! " + GOOD, "not_json"),
                       (GOOD + "\nHope this helps", "not_json"), ('{"visual_score": 1}', "missing_field"),
                       (GOOD.replace('"visual_score": 9', '"visual_score": -1'), "out_of_range"),
                       (GOOD.replace('"visual_score": 9', '"visual_score": true'), "not_a_number"),
                       (GOOD.replace('"visual_score": 9', '"visual_score": NaN'), "not_a_number")]:
        with pytest.raises(MalformedReply) as e:
            parse_judgement(text)
        assert e.value.kind == kind, text



# ----------------------------------------------------------------------------- the HTTP client

def test_request_carries_prompt_image_and_api_key(tmp_path, serve, monkeypatch):
    instruction = "How do I open this?"
    server = serve({})      # every request gets a 404: we only look at what was sent
    monkeypatch.setenv("MY_JUDGE_KEY", "sekret")
    args = build_safetag.parse_args(["--pool", "x.jsonl", "--judge_url", server.url + "/", "--judge_model", "jm",
                                     "--api_key_env", "MY_JUDGE_KEY", "--out_dir", str(tmp_path), "--max_retries", "0"])
    judge = build_safetag.make_judge(args)
    image = png((1, 2, 3))
    with pytest.raises(JudgeError, match="HTTP 404"):
        judge(instruction, image)
    body = server.requests[0]["body"]
    assert server.requests[0]["auth"] == "Bearer sekret"
    assert body["model"] == "jm" and body["temperature"] == 0.0 and "max_tokens" not in body
    parts = body["messages"][0]["content"]
    assert parts[0]["image_url"]["url"] == "data:image/png;base64," + base64.b64encode(image).decode()
    assert parts[1]["text"] == JUDGE_PROMPT.replace("{instruction}", instruction)
    monkeypatch.delenv("MY_JUDGE_KEY")
    with pytest.raises(ValueError, match="MY_JUDGE_KEY is not set"):
        build_safetag.make_judge(args)


def test_retries_on_429_and_connection_errors_not_on_4xx(serve):
    server = serve({"rate": [("status", 429), ("status", 429), ("reply", GOOD)], "nope": [("status", 422)]})
    judge = client(server.url)
    reply = judge("rate", png((0, 0, 0)))
    assert reply.text == GOOD and reply.attempts == 3
    with pytest.raises(JudgeError) as e:
        judge("nope", png((0, 0, 0)))
    assert e.value.attempts == 1 and not e.value.retryable
    dead = JudgeServer({})
    url = dead.url
    dead.close()                                            # nothing listens on this port any more
    refused = client(url, max_retries=1)
    with pytest.raises(JudgeError, match="cannot connect") as e:
        refused("x", png((0, 0, 0)))
    assert e.value.attempts == 2 and refused.requests == 2


def test_local_model_judge_follows_the_sample_contract(monkeypatch):
    """model.load, model.load_processor (Processor.encode takes image bytes) and sample.generate (a rollout with
    response_ids and response_mask), faked with the signatures the real ones have."""
    import types

    import torch
    calls = {}

    class Processor:
        stop_token_ids, pad_token_id = [0], 0

        def encode(self, text, images):
            calls["text"], calls["images"] = text, images
            return {"input_ids": torch.tensor([5, 6])}

        def decode(self, ids, skip_special_tokens=False):
            return "".join(chr(i) for i in ids)

    def generate(model, prompts, group_size, max_new_tokens, temperature=1.0, stop_token_ids=(), pad_token_id=0, seed=0):
        calls["generate"] = dict(group_size=group_size, temperature=temperature, n=len(prompts))
        ids = torch.tensor([[ord(c) for c in GOOD] + [0, 0]])
        mask = torch.tensor([[1] * len(GOOD) + [0, 0]])
        return types.SimpleNamespace(response_ids=ids, response_mask=mask)

    monkeypatch.setitem(sys.modules, "model", types.SimpleNamespace(load=lambda p, device: "M", load_processor=lambda p: Processor()))
    monkeypatch.setitem(sys.modules, "sample", types.SimpleNamespace(generate=generate))
    judge = judge_mod.LocalModelJudge("/ckpt", prompt="Judge: {instruction}")
    image = png((1, 1, 1))
    reply = judge("q?", image)
    assert parse_judgement(reply.text)["visual_score"] == 9
    assert calls["text"] == "Judge: q?" and calls["images"] == [image]   # the processor decodes the bytes
    assert calls["generate"] == {"group_size": 1, "temperature": 0.0, "n": 1}
