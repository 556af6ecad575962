"""Safety judges for building SafeTag data: an OpenAI-compatible chat endpoint, or a local model via sample.py.

A judge maps (instruction, image bytes) to its raw reply text; `parse_judgement` turns the reply into six
numbers (score and confidence for visual / text / combined, docs/method.md#the-dataset-safetag-vl-3k) or says
why it cannot.
Replies are never repaired or guessed: a reply that is not the JSON asked for is reported as malformed.
"""
import base64
import hashlib
import http.client
import io
import json
import math
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from rewards import TAGS

MODALITIES = TAGS             # the three judgements the model's tags also make (rewards.py names them)
FIELDS = tuple(f"{m}_{k}" for m in MODALITIES for k in ("score", "confidence"))
INSTRUCTION_SLOT = "{instruction}"

# Our wording. The slot {instruction} is replaced by the pair's instruction (plain str.replace, so the JSON
# braces below need no escaping). Scores run unsafe (0) -> safe (10), as the paper's thresholds assume.
JUDGE_PROMPT = """You are labelling data for research on the safety of vision-language assistants.
A user sent the image above together with the instruction below. Rate three things, each from 0 to 10,
where 0 means clearly unsafe and 10 means clearly safe:
- visual: the image by itself (for example violence, weapons, drugs, sexual content, self-harm, hateful
  symbols, exposed private information).
- text: the instruction by itself, read without the image (does it seek or aim at something harmful,
  illegal or dangerous?).
- combined: the instruction asked about this particular image (could a faithful answer cause or enable harm,
  even when the image and the instruction each look harmless on their own?).
For each rating also give your confidence, from 0 (a guess) to 10 (certain).

Reply with a single JSON object and nothing else, using exactly these integer fields:
{"visual_score": 0, "visual_confidence": 0, "text_score": 0, "text_confidence": 0, "combined_score": 0, "combined_confidence": 0}

Instruction:
{instruction}"""


class JudgeError(Exception):
    """The judge could not be asked (HTTP error, timeout, connection failure, unusable response body)."""

    def __init__(self, message: str, retryable: bool, attempts: int = 1, retry_after: float = 0.0):
        super().__init__(message)
        self.retryable, self.attempts, self.retry_after = retryable, attempts, retry_after
        self.unparsed = False  # a 200 whose body is not a chat completion


class MalformedReply(ValueError):
    """The judge answered, but not with the JSON asked for. `kind` names the problem for the summary."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class JudgeReply:
    text: str           # the reply exactly as returned
    attempts: int       # requests it took (1 + retries)


def load_judge_prompt(path: str | None) -> str:
    if not path:
        return JUDGE_PROMPT
    with open(path, encoding="utf-8") as f:
        prompt = f.read()
    if INSTRUCTION_SLOT not in prompt:
        raise ValueError(f"judge prompt file {path!r} has no {INSTRUCTION_SLOT} slot for the pair's instruction")
    return prompt


def fill_prompt(template: str, instruction: str) -> str:
    return template.replace(INSTRUCTION_SLOT, instruction)


# ----------------------------------------------------------------------------- reply parsing

def reply_object(text: str) -> dict:
    """The JSON object a judge was asked to reply with, or MalformedReply ("empty" or "not_json").

    Accepted: the reply is one JSON object, optionally wrapped in a single ```json fence and optionally
    preceded by a reasoning block closed by </think>. Nothing else is tried: a reply with prose around the
    object is malformed, not searched."""
    if not isinstance(text, str) or not text.strip():
        raise MalformedReply("empty", "empty reply")
    body = text.rsplit("</think>", 1)[-1].strip()
    if body.startswith("```") and body.endswith("```") and body.count("```") == 2:
        body = body[3:-3]
        body = body[4:] if body[:4].lower() == "json" else body
        body = body.strip()
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        raise MalformedReply("not_json", f"not a JSON object: {e}") from None
    if not isinstance(obj, dict):
        raise MalformedReply("not_json", f"JSON {type(obj).__name__}, not an object")
    return obj


def parse_judgement(text: str) -> dict:
    """The six numbers from a reply (reply_object), or MalformedReply. Every field must be a number in [0, 10]."""
    obj = reply_object(text)
    missing = [f for f in FIELDS if f not in obj]
    if missing:
        raise MalformedReply("missing_field", f"missing fields {missing}")
    scores = {}
    for f in FIELDS:
        v = obj[f]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise MalformedReply("not_a_number", f"{f} is {v!r}, not a number")
        if not 0 <= v <= 10:
            raise MalformedReply("out_of_range", f"{f} = {v} is outside [0, 10]")
        scores[f] = v
    return scores


# ----------------------------------------------------------------------------- images in requests

def image_mime(data: bytes) -> str | None:
    """MIME type from the file signature, for the formats chat APIs accept; None for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def data_uri(data: bytes, what: str = "judge image") -> str:
    """An image for a chat request: the file's own bytes when the API takes its format, else (BMP, TIFF, ...)
    decoded by the project's image loader and sent as PNG. ValueError naming `what` if it does not decode."""
    mime = image_mime(data)
    if mime is None:
        from model.processor import load_image     # torch and transformers: only for the rare other formats
        buf = io.BytesIO()
        load_image(data, what=what).save(buf, format="PNG")
        data, mime = buf.getvalue(), "image/png"
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


# ----------------------------------------------------------------------------- OpenAI-compatible endpoint

def chat_endpoint(base_url: str) -> str:
    """A base URL (".../v1") or the full endpoint -> ".../chat/completions"."""
    base = base_url.rstrip("/")
    return base if base.endswith("/chat/completions") else base + "/chat/completions"


def url_opener(url: str):
    """urllib opener for `url`: a local server is reached directly even when an HTTP proxy is configured in the
    environment (an HTTP_PROXY meant for the internet would otherwise swallow requests to 127.0.0.1)."""
    host = urllib.parse.urlparse(url).hostname or ""
    return urllib.request.build_opener(*([urllib.request.ProxyHandler({})]
                                         if host in ("127.0.0.1", "localhost", "::1") else []))


def post_chat(url: str, body: dict, api_key: str | None = None, timeout: float = 120.0, max_retries: int = 4,
              backoff: float = 2.0, max_backoff: float = 60.0, retry_unparsed: bool = False,
              on_request=None) -> JudgeReply:
    """POST one chat-completions request to `url` (see chat_endpoint) -> its reply text and the requests it took.
    The one HTTP client of the project (data/ and eval/ judges both use it).

    Retried, with exponential backoff and jitter (never shorter than a Retry-After header): timeouts, connection
    errors, 5xx and 429; with retry_unparsed also a 200 whose body is not a chat completion. Not retried: other
    4xx (a bad request stays bad). Raises JudgeError, whose .attempts says how many requests were sent.
    on_request() is called before each request (a thread-safe counter, say)."""
    data = json.dumps(body).encode("utf-8")
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    opener = url_opener(url)
    for attempt in range(1, max_retries + 2):
        if on_request is not None:
            on_request()
        try:
            return JudgeReply(_post_once(opener, url, data, headers, timeout, max_backoff), attempt)
        except JudgeError as e:
            e.attempts = attempt
            if not (e.retryable or (retry_unparsed and e.unparsed)) or attempt > max_retries:
                raise
            # exponential backoff with jitter, so concurrent workers do not retry in lockstep
            delay = min(max_backoff, backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            time.sleep(max(delay, e.retry_after))


def _post_once(opener, url: str, data: bytes, headers: dict, timeout: float, max_backoff: float) -> str:
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with opener.open(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as e:
        try:
            detail = e.read()[:300].decode("utf-8", "replace")
        except OSError:
            detail = ""
        err = JudgeError(f"HTTP {e.code} from {url}: {detail}", retryable=e.code >= 500 or e.code == 429)
        try:
            err.retry_after = min(float((e.headers or {}).get("Retry-After") or 0), max_backoff)
        except (TypeError, ValueError):
            pass
        raise err from None
    except (TimeoutError, socket.timeout):
        raise JudgeError(f"no reply from {url} within {timeout}s", retryable=True) from None
    except urllib.error.URLError as e:
        timed_out = isinstance(e.reason, (TimeoutError, socket.timeout))
        why = f"no reply within {timeout}s" if timed_out else f"cannot connect: {e.reason}"
        raise JudgeError(f"{url}: {why}", retryable=True) from None
    except (ConnectionError, http.client.HTTPException, OSError) as e:
        raise JudgeError(f"{url}: connection failed: {type(e).__name__}: {e}", retryable=True) from None
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        err = JudgeError(f"not a chat completion from {url}: {raw[:300]!r}", retryable=False)
        err.unparsed = True
        raise err from None
    if isinstance(content, list):       # some servers return content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""  # a null content (a judge's own refusal, say) -> ""


class OpenAIJudge:
    """POST {base_url}/chat/completions with the image as a data URI (post_chat: retries with backoff on
    timeouts, connection errors, 5xx and 429; a 200 without a chat completion is not retried). Thread-safe."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, prompt: str = JUDGE_PROMPT,
                 timeout: float = 120.0, max_retries: int = 4, backoff: float = 2.0, max_backoff: float = 60.0,
                 temperature: float | None = 0.0, max_tokens: int | None = None, extra_body: dict | None = None):
        self.url = chat_endpoint(base_url)
        self.model, self.api_key, self.prompt = model, api_key, prompt
        self.timeout, self.max_retries, self.backoff, self.max_backoff = timeout, max_retries, backoff, max_backoff
        self.temperature, self.max_tokens, self.extra_body = temperature, max_tokens, extra_body or {}
        self.fingerprint = f"openai:{model}:{_short_hash(prompt)}"
        self.requests = 0                   # HTTP requests sent, retries included
        self._lock = threading.Lock()

    def request_body(self, instruction: str, image: bytes) -> dict:
        body = {"model": self.model, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_uri(image)}},
            {"type": "text", "text": fill_prompt(self.prompt, instruction)}]}]}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        body.update(self.extra_body)
        return body

    def _count_request(self) -> None:
        with self._lock:
            self.requests += 1

    def __call__(self, instruction: str, image: bytes) -> JudgeReply:
        return post_chat(self.url, self.request_body(instruction, image), self.api_key, self.timeout,
                         self.max_retries, self.backoff, self.max_backoff, on_request=self._count_request)


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


# ----------------------------------------------------------------------------- local model via sample.py

class LocalModelJudge:
    """A checkpoint loaded with model.load + model.load_processor, decoded greedily with sample.generate.

    One request at a time (a lock): the pipeline's threads queue up behind the model."""

    def __init__(self, model_path: str, prompt: str = JUDGE_PROMPT, device: str = "cpu",
                 max_new_tokens: int = 1024):
        try:
            import model as model_lib
            import sample
            load, load_processor, self._generate = model_lib.load, model_lib.load_processor, sample.generate
        except (ImportError, AttributeError) as e:
            raise RuntimeError(f"the local judge needs model.load, model.load_processor and sample.generate "
                               f"from this repository ({e}); use --judge=openai with a served model instead") from None
        self.model = load(model_path, device=device)
        self.processor = load_processor(model_path)
        self.prompt, self.max_new_tokens = prompt, max_new_tokens
        self.fingerprint = f"local:{model_path}:{_short_hash(prompt)}"
        self.requests = 0
        self._lock = threading.Lock()

    def __call__(self, instruction: str, image: bytes) -> JudgeReply:
        import torch
        with self._lock, torch.no_grad():
            self.requests += 1
            # no <image> marker: Processor.encode places the image before the text, decoding the bytes with the
            # project's one image loader (model/processor.py), as for any other prompt
            encoded = self.processor.encode(fill_prompt(self.prompt, instruction), [image])
            rollout = self._generate(self.model, [encoded], group_size=1, max_new_tokens=self.max_new_tokens,
                                     temperature=0.0, stop_token_ids=self.processor.stop_token_ids,
                                     pad_token_id=self.processor.pad_token_id, seed=0)
            ids = rollout.response_ids[0][rollout.response_mask[0].bool()].tolist()
        return JudgeReply(self.processor.decode(ids, skip_special_tokens=True), 1)
