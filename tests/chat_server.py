"""A chat-completions server on 127.0.0.1 for the judge tests: a real HTTP endpoint, OpenAI-compatible, whose
every reply comes from a script, so the verdicts a test expects are known in advance.

    server = ChatServer(lambda body, n: (200, completion("Verdict: safe")))   # n: this request's number, from 1
    ... ChatClient(server.url) ...; server.requests[0]["body"]; server.close()
JudgeServer scripts the SafeTag judge per instruction (tests/conftest.py's `serve` fixture starts them).
"""
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

from data.judge import OpenAIJudge


def completion(text):
    """The body of a chat completion whose message is `text`."""
    return {"choices": [{"message": {"role": "assistant", "content": text}}]}


def prompt_text(body):
    """The text of the request's user turn (the first content part when images are attached)."""
    content = body["messages"][0]["content"]
    return content if isinstance(content, str) else content[0]["text"]


class ChatServer:
    """Serves POST requests with `script(body, n) -> (status, reply)`: reply a dict (sent as JSON), a str or bytes
    (sent as they are, e.g. garbage). The script may sleep to outlast a client's timeout. Records
    {"path", "body", "auth"} of each request in `requests`, in arrival order."""

    def __init__(self, script):
        self.script, self.requests, self.lock = script, [], threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with owner.lock:
                    owner.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                    n = len(owner.requests)
                status, reply = owner.script(body, n)
                data = reply if isinstance(reply, bytes) else reply.encode() if isinstance(reply, str) \
                    else json.dumps(reply).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass             # the client gave up (a timeout) before the answer came

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads, self.server.block_on_close = True, False    # close() never waits on a sleeper
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# ----------------------------------------------------------------------------- the SafeTag judge (data/judge.py)

TIMEOUT = 1.0          # client timeout in these tests; "sleep" actions outlast it (generous: slow CI machines)


def png(color, size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def answer(v, vc, t, tc, c, cc) -> str:
    return json.dumps({"visual_score": v, "visual_confidence": vc, "text_score": t, "text_confidence": tc,
                       "combined_score": c, "combined_confidence": cc})


class JudgeServer(ChatServer):
    """The chat server answering each instruction by a script.

    script[instruction] is a list of actions, one per request for that instruction (the last one repeats):
    ("reply", text) -> a chat completion; ("status", code) -> that HTTP error; ("sleep", s) -> no answer for
    s seconds; ("raw", bytes) -> a 200 whose body is not a chat completion. Tests use the judge prompt
    "{instruction}", so the text part of each request is the instruction itself; `asked` lists them in order.
    on_request(n) is called with each request's number before it is answered."""

    def __init__(self, script, on_request=None):
        self.actions, self.on_request, self.asked = script, on_request, []
        super().__init__(self.reply)

    def reply(self, body, n):
        text = next(p["text"] for p in body["messages"][0]["content"] if p["type"] == "text")
        with self.lock:
            earlier = self.asked.count(text)
            self.asked.append(text)
        if self.on_request:
            self.on_request(n)
        actions = self.actions.get(text, [("status", 404)])
        kind, value = actions[min(earlier, len(actions) - 1)]
        if kind == "sleep":
            time.sleep(value)
            kind, value = "reply", answer(9, 9, 9, 9, 9, 9)
        if kind == "status":
            return value, {"error": "scripted"}
        if kind == "raw":
            return 200, value
        return 200, {"id": "x", "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": value}, "finish_reason": "stop"}]}


def client(url, **kw):
    kw = {"prompt": "{instruction}", "timeout": TIMEOUT, "max_retries": 2, "backoff": 0.01, "max_backoff": 0.05, **kw}
    return OpenAIJudge(url, "test-judge", **kw)


GOOD = answer(9, 9, 9, 9, 9, 9)  # a reply that keeps a pair with every verdict safe, all confident
