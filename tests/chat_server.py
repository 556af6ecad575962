"""A chat-completions server on 127.0.0.1 for the judge tests: a real HTTP endpoint, OpenAI-compatible, whose
every reply comes from a script, so the verdicts a test expects are known in advance.

    server = ChatServer(lambda body, n: (200, completion("Verdict: safe")))   # n: this request's number, from 1
    ... ChatClient(server.url) ...; server.requests[0]["body"]; server.close()
"""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


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
