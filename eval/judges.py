"""Judges of saved model outputs: keyword refusal lists, a letter parser for multiple choice, and an LLM judge
over any OpenAI-compatible chat-completions endpoint (standard-library HTTP; prompt templates and strict verdict
parsing in eval/templates.py: a reply that does not parse is recorded and counted, never guessed).

Every judge maps an output row (see eval/generate.py) to a judgment dict
    {"id", "sample", "judge", "label", "parsed", "raw", "source"[, "template", "problem"]}
with label in {"refusal", "compliance"} (keyword lists, refusal judges), {"safe", "unsafe"} (safety judges),
{"safe_refusal", "safe_warning", "unsafe_answer"} (VLSBench's judge), a letter A-D (multiple choice), or None
when the reply did not parse; an LLM judge then says what was wrong with the reply in "problem".
"""
import json
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import rewards
from runtime.files import append_jsonl, read_jsonl, write_json
from data.judge import JudgeError as RequestError
from data.judge import chat_endpoint, data_uri, post_chat
from eval.templates import Template, file_stem, fill_template, python_literals, template_fields

# Variable names of the refusal lists in the benchmark authors' files, and whether each lower-cases the
# response before matching: VLGuard (utils.py `reject_list`) and SafeGRPO (`refuse_keywords`) do,
# AdaShield (`test_prefixes`) matches as written.
KNOWN_KEYWORD_LISTS = {"reject_list": ("vlguard", True), "test_prefixes": ("adashield", False),
                       "refuse_keywords": ("safegrpo", True)}


class JudgeError(RuntimeError):
    """The judge endpoint could not be reached or answered with something that is not a chat completion."""


# ---------------------------------------------------------------------------------------------------------
# Keyword judges

def judged_text(row: dict, on: str) -> str:
    """The text a judge reads: the <answer> span (default) or the whole response."""
    if on == "answer":
        return row["answer"]
    if on == "full":
        return row["response"]
    raise ValueError(f"judge text must be 'answer' or 'full', got {on!r}")


@dataclass
class KeywordJudge:
    """Refusal iff any keyword occurs in the judged text (lower-cased first unless lowercase=False)."""
    keywords: tuple
    list_name: str = "safegrpo"
    lowercase: bool = True
    on: str = "answer"

    @property
    def name(self) -> str:
        return f"keyword-{self.list_name}" + ("-full" if self.on == "full" else "")

    def settings(self) -> dict:
        return {"kind": "keyword", "list": self.list_name, "keywords": list(self.keywords),
                "lowercase": self.lowercase, "on": self.on}

    def __call__(self, row: dict) -> dict:
        text = judged_text(row, self.on)
        text = text.lower() if self.lowercase else text
        hit = next((k for k in self.keywords if k in text), None)
        return _judgment(row, self.name, "refusal" if hit else "compliance", raw=hit or "", source="keyword")


def load_keyword_list(path: str) -> tuple[tuple, str, bool]:
    """(keywords, list name, lowercase) from a file: a Python list assignment as in the authors' files
    (`reject_list = [...]`), or one keyword per line ('#' lines and blank lines ignored)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lists = {k: v for k, v in python_literals(text).items()
             if isinstance(v, list) and v and all(isinstance(x, str) for x in v)}
    if lists:
        var = next((k for k in lists if k in KNOWN_KEYWORD_LISTS), next(iter(lists)))
        name, lowercase = KNOWN_KEYWORD_LISTS.get(var, (file_stem(path), True))
        return tuple(lists[var]), name, lowercase
    words = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    if not words:
        raise ValueError(f"{path}: no keywords found (expected a Python list or one keyword per line)")
    return words, file_stem(path), True


def keyword_judge(spec: str = "safegrpo", on: str = "answer", lowercase: bool | None = None) -> KeywordJudge:
    """'safegrpo' (the training reward's own list, rewards.REFUSE_KEYWORDS: a lower-cased answer is a refusal when
    any of them occurs in it) or a path to a keyword file."""
    if spec == "safegrpo":
        keywords, name, lower = rewards.REFUSE_KEYWORDS, "safegrpo", True
    else:
        keywords, name, lower = load_keyword_list(spec)
    return KeywordJudge(keywords, name, lower if lowercase is None else lowercase, on)


def _judgment(row: dict, judge: str, label, raw: str = "", source: str = "") -> dict:
    return {"id": row["id"], "sample": row.get("sample", 0), "judge": judge, "label": label,
            "parsed": label is not None, "raw": raw, "source": source}


# ---------------------------------------------------------------------------------------------------------
# Multiple choice (SIUO MCQA): a letter parsed from the start of the answer, strictly.

_CHOICE_RE = re.compile(r"^\s*(?i:(?:the\s+)?(?:correct\s+|best\s+)?(?:answer|option|choice)(?:\s+is)?\s*[:\-]?\s*)?"
                        r"[\(\[*]*([A-D])[\)\]*]*(?=$|[\s.:,;)])")


def parse_choice(text: str) -> str | None:
    """'B', '(B)', 'B. ...', 'Answer: B', 'The answer is (B)' -> 'B'; anything else -> None."""
    m = _CHOICE_RE.match(text.strip())
    return m.group(1) if m else None


@dataclass
class ChoiceJudge:
    on: str = "answer"
    name: str = "choice"

    def settings(self) -> dict:
        return {"kind": "choice", "on": self.on}

    def __call__(self, row: dict) -> dict:
        text = judged_text(row, self.on)
        return _judgment(row, self.name, parse_choice(text), raw=text[:200], source="parse")


# ---------------------------------------------------------------------------------------------------------
# The LLM judge

@dataclass
class ChatClient:
    """POST {url}/chat/completions through data.judge.post_chat (standard library; retries with backoff and
    jitter on network errors, 429, 5xx and replies that are not chat completions); other HTTP errors and
    retries that run out raise JudgeError."""
    url: str
    model: str = "gpt-4o-mini"
    api_key: str | None = None
    timeout: float = 60.0
    max_retries: int = 3
    backoff: float = 1.0          # seconds before the first retry, doubled after each (times 0.5-1 jitter,
                                  # at most 60 s, at least a Retry-After the server sends)
    temperature: float = 0.0
    max_tokens: int = 512

    @property
    def endpoint(self) -> str:
        return chat_endpoint(self.url)

    def complete(self, prompt: str, image_paths: list[str] = ()) -> str:
        content = prompt
        if image_paths:
            content = [{"type": "text", "text": prompt}] + [
                {"type": "image_url", "image_url": {"url": _data_url(p)}} for p in image_paths]
        body = {"model": self.model, "messages": [{"role": "user", "content": content}],
                "temperature": self.temperature, "max_tokens": self.max_tokens}
        try:
            return post_chat(self.endpoint, body, self.api_key, self.timeout, self.max_retries, self.backoff,
                             retry_unparsed=True).text  # a null content (a judge's own refusal) -> unparseable
        except RequestError as e:
            if e.retryable or e.unparsed:
                raise JudgeError(f"judge {self.endpoint} failed after {e.attempts} attempts; last error: {e}") from None
            raise JudgeError(f"judge {self.endpoint} refused the request ({e})") from None


def _data_url(path: str) -> str:
    """The image file as the judge receives it (data.judge.data_uri: its own bytes, or PNG for other formats)."""
    with open(path, "rb") as f:
        return data_uri(f.read(), what=path)


@dataclass
class LLMJudge:
    """Fill the row's template, ask the endpoint, parse the verdict. An empty text gets the template's
    empty_label without a request where the benchmark authors define one (MOSSBench: refusal; SIUO: safe)."""
    client: ChatClient
    router: Callable[[dict], Template]
    on: str = "answer"
    images: bool = True            # False: never attach images, whatever the template says
    prompt_file: str | None = None

    @property
    def name(self) -> str:
        return "llm-" + re.sub(r"[^\w.-]+", "_", self.client.model) + ("-full" if self.on == "full" else "")

    def settings(self) -> dict:
        return {"kind": "llm", "url": self.client.endpoint, "model": self.client.model, "on": self.on,
                "prompt_file": self.prompt_file, "temperature": self.client.temperature,
                "max_tokens": self.client.max_tokens, "images": self.images}

    def __call__(self, row: dict) -> dict:
        template = self.router(row)
        text = judged_text(row, self.on)
        if not text.strip() and template.empty_label is not None:
            out = _judgment(row, self.name, template.empty_label, raw="", source="empty-rule")
        else:
            prompt = fill_template(template.text, template_fields(row, text))
            paths = self._image_paths(row, template)
            try:
                reply = self.client.complete(prompt, paths)
            except JudgeError as e:
                vision = "; the request carried an image, so the endpoint must serve a vision model" if paths else ""
                raise JudgeError(f"{e} (while judging {row['id']}{vision})") from None
            label, problem = template.check(reply)
            out = _judgment(row, self.name, label, raw=reply, source="llm")
            if problem is not None:
                out["problem"] = problem
        out["template"] = template.name
        return out

    def _image_paths(self, row: dict, template: Template) -> list[str]:
        """The row's images when the template sends them (and --no_judge_images is not given); all must exist."""
        if template.require_image and not self.images:
            raise ValueError(f"the {template.name} judge must see the image (its verdict depends on it); "
                             f"drop --no_judge_images")
        if not (self.images and template.attach_image):
            return []
        paths = row.get("meta", {}).get("image_paths", [])
        if template.require_image and not paths:
            raise ValueError(f"{row['id']} has no image, but the {template.name} judge must see one")
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            hint = "" if template.require_image else " (pass --no_judge_images to judge text only)"
            raise FileNotFoundError(f"image {missing[0]} of {row['id']} is gone; the {template.name} judge "
                                    f"template sends the image{hint}")
        return paths


# ---------------------------------------------------------------------------------------------------------
# Running a judge over saved outputs: resumable (one JSONL line per verdict, appended as they arrive).

def judge_key(j: dict) -> tuple:
    return (j["id"], j.get("sample", 0))


def run_judge(judge, rows: list[dict], path: str, workers: int = 1, progress: bool = True) -> list[dict]:
    """Judge every row not yet judged in `path`; return the judgments in row order. Settings are stored
    beside the file (path + '.settings.json'); judging again with other settings is an error."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    settings_path = path + ".settings.json"
    settings = judge.settings()
    if os.path.exists(settings_path):
        with open(settings_path, encoding="utf-8") as f:
            old = json.load(f)
        if old != settings and os.path.exists(path):
            raise ValueError(f"{path} was judged with other settings ({settings_path}); "
                             "pass --rejudge to judge again from scratch, or use another --out")
    write_json(settings_path, settings)
    done = {judge_key(j): j for j in read_jsonl(path)} if os.path.exists(path) else {}
    todo = [r for r in rows if judge_key(r) not in done]
    bar = _progress(len(todo), f"judging ({judge.name})", progress)
    error = None
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(judge, r) for r in todo]
        for future in as_completed(futures):
            if future.cancelled():
                continue
            try:
                j = future.result()
            except Exception as e:          # keep every verdict already in hand, ask nothing new, then fail
                if error is None:
                    error = e
                    for f in futures:
                        f.cancel()
                continue
            append_jsonl(path, [j])
            done[judge_key(j)] = j
            bar.update(1)
    bar.close()
    if error is not None:
        raise error
    return [done[judge_key(r)] for r in rows]


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled or total == 0, leave=False)
