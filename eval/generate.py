"""Generate model outputs for benchmark records through sample.py and save them as JSONL, think and answer
spans split. Resumable: rows are appended batch by batch (flushed and synced), a torn last line from a crash
is dropped on reading, and a rerun generates only what is missing.

One output row: {"id", "sample", "benchmark", "subset", "question", "user_text", "response", "think",
"answer", "answer_source", "finish_reason", "num_tokens", "labels", "meta"}.
"""
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass

from runtime.files import append_jsonl, read_jsonl, write_json

# ---------------------------------------------------------------------------------------------------------
# Response spans (docs/method.md#output-format): <think> ... </think> <answer> ... </answer>. The chat template's
# generation prompt opens <think> itself, so a response usually starts inside the think block.

_ANSWER_RE = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL | re.IGNORECASE)


def split_response(text: str, opened_think: bool = False) -> tuple[str, str, str]:
    """(think, answer, answer_source). opened_think: the prompt ended in <think> (Thinking chat templates),
    so the response starts inside the think block.
    The answer is the first <answer> span after </think> ("tag"; an unclosed span runs to the end), else the
    text after </think> ("after_think"), else, with no think block at all, the whole text ("full"). Thinking
    that never closed (e.g. cut by max_new_tokens) has no answer ("none")."""
    lower = text.lower()
    if "</think>" in lower:
        cut = lower.index("</think>")
        think, rest = _strip_open_think(text[:cut]), text[cut + len("</think>"):]
    elif opened_think or lower.lstrip().startswith("<think>"):
        return _strip_open_think(text), "", "none"
    else:
        think, rest = "", text
    m = _ANSWER_RE.search(rest)
    if m:
        return think, m.group(1).strip(), "tag"
    return think, rest.strip(), "after_think" if "</think>" in lower else "full"


def _strip_open_think(text: str) -> str:
    text = text.strip()
    return text[len("<think>"):].strip() if text.lower().startswith("<think>") else text


# ---------------------------------------------------------------------------------------------------------
# Generation

@dataclass
class GenerationConfig:
    max_new_tokens: int = 4096       # the paper's response budget
    temperature: float = 0.0         # 0 = greedy (the default for evaluation)
    top_p: float = 1.0
    top_k: int = 0
    group_size: int = 1              # G: responses per record, as in training (> 1 needs temperature > 0)
    seed: int = 0
    step_guided: bool = True         # append the step-guided instruction (data/prompt.py) to each question
    prompt_file: str | None = None   # a user's own step-guided instruction

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.group_size > 1 and self.temperature == 0:
            raise ValueError("group_size > 1 with greedy decoding gives identical samples; set temperature > 0")
        if self.prompt_file is not None and not self.step_guided:
            raise ValueError("a step-guided prompt file was given but the step-guided prompt is off")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def prompt_opens_think(processor) -> bool:
    """Whether the chat template's generation prompt opens the think block (Qwen3-VL Thinking models)."""
    rendered = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "x"}]}], tokenize=False, add_generation_prompt=True)
    return rendered.rstrip().endswith("<think>")


def user_text(question: str, config: GenerationConfig) -> str:
    if not config.step_guided:
        return question
    from data.prompt import build_prompt
    return build_prompt(question, config.prompt_file)


def record_seed(seed: int, record_id: str) -> int:
    """The sampling key of one record: a function of (seed, id) only, so a record's samples do not depend on
    the batch it lands in (batch size, or what was left after a crash). The project's one key hash (rollout.randomness.hash64)
    over the seed and the id's 64-bit digest."""
    from rollout.randomness import hash64
    return hash64(seed, int.from_bytes(hashlib.blake2b(record_id.encode("utf-8"), digest_size=8).digest(), "little"))


def output_key(row: dict) -> tuple:
    return (row["id"], row.get("sample", 0))


def read_settings(path: str) -> dict:
    """The generation settings saved beside an outputs file (outputs.jsonl.settings.json)."""
    with open(path, encoding="utf-8") as f:
        settings = json.load(f)
    if "num_samples" in settings:       # written before G was called group_size, as in train.py
        settings["group_size"] = settings.pop("num_samples")
    return settings


def generate_outputs(load_model, records, path: str, config: GenerationConfig, benchmark: str,
                     model_name: str = "", batch_size: int = 8, progress: bool = True) -> list[dict]:
    """Generate every (record, sample) not yet in `path`; return all rows in record order.

    load_model() -> (model, processor), called only when something is left to generate.
    records: a Sequence of Records (eval.benchmarks.RecordList decodes images only for the batch at hand).
    The settings are stored in path + '.settings.json'; resuming with other settings is an error."""
    import torch
    from tqdm import tqdm

    import sample

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    settings = {"benchmark": benchmark, "model": model_name, **asdict(config)}
    settings_path = path + ".settings.json"
    if os.path.exists(path) and os.path.exists(settings_path):
        old = read_settings(settings_path)
        if old != settings:
            changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise ValueError(f"{path} holds outputs generated with other settings ({', '.join(changed)} differ); "
                             f"use another --out, or delete the file to start over")
    write_json(settings_path, settings)

    done = {output_key(r): r for r in read_jsonl(path)} if os.path.exists(path) else {}
    ids = records.ids if hasattr(records, "ids") else [r.id for r in records]
    G = config.group_size
    todo = [i for i, rid in enumerate(ids) if any((rid, s) not in done for s in range(G))]
    if todo:
        model, processor = load_model()
        stop_ids = list(processor.stop_token_ids)
        opened_think = prompt_opens_think(processor)

    bar = tqdm(total=len(todo), desc=f"generating ({benchmark})", disable=not progress or not todo)
    for start in range(0, len(todo), batch_size):
        batch = [records[i] for i in todo[start:start + batch_size]]
        texts = [user_text(r.prompt, config) for r in batch]
        prompts = [processor.encode(t, r.images) for t, r in zip(texts, batch)]
        with torch.no_grad():
            rollout = sample.generate(
                model, prompts, group_size=G, max_new_tokens=config.max_new_tokens,
                temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,   # temperature 0 = argmax
                stop_token_ids=stop_ids, seed=config.seed, pad_token_id=processor.pad_token_id,
                prompt_seeds=[record_seed(config.seed, r.id) for r in batch])
        new_rows = []
        for r in range(len(batch) * G):                     # row r = prompt r // G, sample r % G
            record, s = batch[r // G], r % G
            if (record.id, s) in done:
                continue
            ids_r = rollout.response_ids[r][rollout.response_mask[r].bool()].tolist()
            if rollout.finish_reason[r] == "stop":          # the stop token ends the turn; it is not text
                ids_r = ids_r[:-1]
            response = processor.decode(ids_r, skip_special_tokens=True)
            think, answer, source = split_response(response, opened_think)
            row = {"id": record.id, "sample": s, "benchmark": benchmark, "subset": record.subset,
                   "question": record.prompt, "user_text": texts[r // G], "response": response, "think": think,
                   "answer": answer, "answer_source": source, "finish_reason": rollout.finish_reason[r],
                   "num_tokens": int(rollout.response_mask[r].sum()), "labels": record.labels,
                   "meta": record.meta}
            new_rows.append(row)
            done[(record.id, s)] = row
        append_jsonl(path, new_rows)
        bar.update(len(batch))
    bar.close()
    return [json.loads(json.dumps(done[(rid, s)], default=str)) for rid in ids for s in range(G)]
