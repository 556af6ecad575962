"""Loaders for the safety benchmarks in their native formats (docs/method.md#evaluation-protocol lists them;
tests/data/ holds a few real rows of each), and the toy world's held-out split.

Each loader reads the benchmark's own files and returns a `RecordList` of `data.record.Record`s; images are
checked up front (a missing file is an error naming it) and decoded only when a record is taken.
"""
import csv
import dataclasses
import json
import os
from collections.abc import Callable, Sequence

from PIL import Image

from config import TOY_PRESET
from data.record import Record

MMSB_KINDS = ("SD", "SD_TYPO", "TYPO")
# MM-SafetyBench scenarios 10-13 (legal, financial, health, government) are judged by another rule
# (a safe answer carries a disclaimer or declines), so reports keep them apart from 01-09.
MMSB_DISCLAIMER_SCENARIOS = ("10", "11", "12", "13")
VLGUARD_SUBSETS = ("safe_safes", "safe_unsafes", "unsafes")
MCQA_LETTERS = ("A", "B", "C", "D")

# Our wording of the SIUO multiple-choice instruction (the authors' prompt is not copied here).
SIUO_MCQA_PROMPT = ("Answer the multiple-choice question about the image with the letter of the best option "
                    "only.\n\nQuestion: {question}\nOptions:\n{options}")


class BenchmarkError(ValueError):
    """A benchmark file that does not have the expected native format (says which file, row and field)."""


# ---------------------------------------------------------------------------------------------------------
# The record list: everything but the pixels is read eagerly; images are decoded when a record is taken, so
# a 5,000-image benchmark never sits in memory and a missing image fails before any generation starts.

ImageSource = str | Callable[[], Image.Image]   # a file path, or a function that draws the image


def open_rgb(source: ImageSource, what: str = "image") -> Image.Image:
    """The image as the model sees it: through the project's one loader (model/processor.py's load_image: EXIF
    orientation applied, then RGB), as sample.py and training read images. Errors start with `what` and name
    the file: FileNotFoundError when it is gone, ValueError when it does not decode."""
    from model.processor import load_image      # pulls in torch and transformers: only when pixels are needed
    return load_image(source() if callable(source) else source, what=what)


class RecordList(Sequence):
    """A sequence of Records whose images are decoded on access. `ids` and `stubs` never touch pixels."""

    def __init__(self, stubs: list[Record], sources: list[list[ImageSource]]):
        assert len(stubs) == len(sources)
        ids = [r.id for r in stubs]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise BenchmarkError(f"duplicate record id {dup!r}: ids must be unique within a benchmark")
        self.stubs = stubs        # the records with images=[] (cheap: ids, prompts, labels, meta)
        self.sources = sources    # per record, where its images come from

    @classmethod
    def from_records(cls, records: Sequence[Record]) -> "RecordList":
        """Wrap records that already hold their images (e.g. from the SafeTag loader)."""
        if isinstance(records, RecordList):
            return records
        stubs = [dataclasses.replace(r, images=[]) for r in records]
        sources = [[(lambda im=im: im) for im in r.images] for r in records]
        return cls(stubs, sources)

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.stubs]

    def __len__(self) -> int:
        return len(self.stubs)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return RecordList(self.stubs[i], self.sources[i])
        stub = self.stubs[i]
        return dataclasses.replace(stub, images=[open_rgb(s, what=stub.id) for s in self.sources[i]])


def _check_images(benchmark: str, paths: list[str], hint: str) -> None:
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"{benchmark}: image not found: {missing[0]}{more}. {hint}")


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise BenchmarkError(f"{path}: not valid JSON ({e})") from e


def _read_list(path: str, rows: str) -> list:
    """A JSON file that must hold a list (of `rows`, e.g. "VLGuard rows", named in the error)."""
    table = _read_json(path)
    if not isinstance(table, list):
        raise BenchmarkError(f"{path}: expected a JSON list of {rows}, got {type(table).__name__}")
    return table


def _field(row: dict, key: str, where: str):
    if not isinstance(row, dict):
        raise BenchmarkError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if key not in row:
        raise BenchmarkError(f"{where}: missing field {key!r}")
    return row[key]


# ---------------------------------------------------------------------------------------------------------
# MM-SafetyBench: one JSON per scenario, {qid: {Question, Key Phrase, Rephrased Question, ...}};
# images imgs/{scenario}/{SD|SD_TYPO|TYPO}/{qid}.jpg. SD pairs with "Rephrased Question(SD)", the others with
# "Rephrased Question".

def mmsb_group(scenario: str) -> str:
    """'01-09' or '10-13': the two scenario groups reported separately."""
    return "10-13" if scenario[:2] in MMSB_DISCLAIMER_SCENARIOS else "01-09"


def load_mmsafetybench(path: str, image_root: str, kinds: Sequence[str] = MMSB_KINDS,
                       scenarios: Sequence[str] | None = None, ids_file: str | None = None) -> RecordList:
    """path: a folder of NN-Scenario.json files (upstream data/processed_questions) or one such file.
    image_root: the folder holding the scenario folders (upstream data/imgs). scenarios: names or 2-digit
    prefixes to keep. ids_file: TinyVersion_ID_List.json to keep only the official Tiny subset."""
    for kind in kinds:
        if kind not in MMSB_KINDS:
            raise BenchmarkError(f"MM-SafetyBench: unknown image kind {kind!r}; choose from {', '.join(MMSB_KINDS)}")
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".json"))
    else:
        files = [path]
    if not files:
        raise BenchmarkError(f"MM-SafetyBench: no NN-Scenario.json files in {path}")
    keep_ids = None
    if ids_file is not None:
        keep_ids = {_field(e, "Scenario", ids_file): {str(i) for i in _field(e, "Sampled_ID_List", ids_file)}
                    for e in _read_json(ids_file)}
    stubs = []
    for file in files:
        scenario = os.path.splitext(os.path.basename(file))[0]
        if scenarios and not any(scenario == s or scenario[:2] == s for s in scenarios):
            continue
        table = _read_json(file)
        if not isinstance(table, dict):
            raise BenchmarkError(f"{file}: expected a JSON object {{qid: question}}, got {type(table).__name__}")
        for qid, row in table.items():
            if keep_ids is not None and qid not in keep_ids.get(scenario, ()):
                continue
            where = f"{file}, question {qid}"
            for kind in kinds:
                prompt = _field(row, "Rephrased Question(SD)" if kind == "SD" else "Rephrased Question", where)
                stubs.append(Record(
                    id=f"mmsafetybench/{scenario}/{kind}/{qid}", prompt=prompt, images=[],
                    labels={"question": _field(row, "Question", where), "key_phrase": row.get("Key Phrase", "")},
                    subset=f"{scenario}/{kind}",
                    meta={"scenario": scenario, "kind": kind, "qid": qid, "group": mmsb_group(scenario),
                          "image_paths": [os.path.join(image_root, scenario, kind, f"{qid}.jpg")]}))
    return _with_checked_images("MM-SafetyBench", stubs,
                                "--image_root should be the folder holding the scenario folders (upstream data/imgs).")


# ---------------------------------------------------------------------------------------------------------
# FigStep / SafeBench: CSV dataset,category_id,task_id,category_name,question,instruction; the image
# query_{dataset}_{category_id}_{task_id}_6.png renders `instruction` + "1. 2. 3."; the text prompt is fixed.

FIGSTEP_COLUMNS = ("dataset", "category_id", "task_id", "category_name", "question", "instruction")


def _render_figstep(instruction: str) -> Image.Image:
    from data import typography    # only needed when regenerating images
    return typography.render_figstep(instruction)


def load_figstep(path: str, text_prompt: str, image_root: str | None = None,
                 regenerate_images: bool = False) -> RecordList:
    """path: a SafeBench CSV. text_prompt: FigStep's fixed incitement text (pass it, e.g. read from a file with
    `read_prompt_file`). Images come from image_root, or are drawn by data/typography.py when
    regenerate_images is set (the same layout and canvas in pillow's font, so not the released pixels)."""
    if not text_prompt or not text_prompt.strip():
        raise BenchmarkError("FigStep needs its fixed text prompt (FigStep README, section 2.1); "
                             "pass it with --text_prompt_file")
    if image_root is None and not regenerate_images:
        raise BenchmarkError("FigStep: give --image_root (the folder of query_*_6.png images) "
                             "or --regenerate_images to draw them with data/typography.py")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in FIGSTEP_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise BenchmarkError(f"{path}: not a SafeBench CSV, missing column(s) {', '.join(missing)}")
        rows = list(reader)
    stubs, sources = [], []
    for row in rows:
        name = f"query_{row['dataset']}_{row['category_id']}_{row['task_id']}_6.png"
        image_path = os.path.join(image_root, name) if image_root is not None else None
        stubs.append(Record(
            id=f"figstep/{row['dataset']}_{row['category_id']}_{row['task_id']}", prompt=text_prompt.strip(),
            images=[], labels={"question": row["question"], "instruction": row["instruction"]},
            subset=row["category_name"],
            meta={"dataset": row["dataset"], "category_id": row["category_id"], "task_id": row["task_id"],
                  "image_paths": [] if regenerate_images else [image_path]}))
        if regenerate_images:
            sources.append([lambda text=row["instruction"]: _render_figstep(text)])
        else:
            sources.append([image_path])
    if not regenerate_images:
        _check_images("FigStep", [s[0] for s in sources],
                      "--image_root should hold query_{dataset}_{category_id}_{task_id}_6.png, "
                      "or use --regenerate_images.")
    return RecordList(stubs, sources)


# ---------------------------------------------------------------------------------------------------------
# VLGuard test: [{id, image, safe, instr-resp[, harmful_category, harmful_subcategory]}]. A safe image holds
# two pairs (safe_instruction -> safe_safes, unsafe_instruction -> safe_unsafes); an unsafe image one
# (instruction -> unsafes).

def load_vlguard(path: str, image_root: str, subsets: Sequence[str] = VLGUARD_SUBSETS) -> RecordList:
    """path: VLGuard's test.json. image_root: the folder the `image` fields are relative to."""
    for s in subsets:
        if s not in VLGUARD_SUBSETS:
            raise BenchmarkError(f"VLGuard: unknown subset {s!r}; choose from {', '.join(VLGUARD_SUBSETS)}")
    table = _read_list(path, "VLGuard rows")
    stubs = []
    for n, row in enumerate(table):
        where = f"{path}, row {n}"
        image_safe = _field(row, "safe", where)
        if not isinstance(image_safe, bool):
            raise BenchmarkError(f"{where}: field 'safe' must be true or false, got {image_safe!r}")
        image_path = os.path.join(image_root, _field(row, "image", where))
        for pair in _field(row, "instr-resp", where):
            if "safe_instruction" in pair:
                subset, instruction = "safe_safes", pair["safe_instruction"]
            elif "unsafe_instruction" in pair:
                subset, instruction = "safe_unsafes", pair["unsafe_instruction"]
            else:
                subset, instruction = "unsafes", _field(pair, "instruction", where + " instr-resp")
            if subset not in subsets:
                continue
            stubs.append(Record(
                id=f"vlguard/{_field(row, 'id', where)}/{subset}", prompt=instruction, images=[],
                labels={"reference_response": pair.get("response", ""), "image_safe": image_safe,
                        "instruction_safe": subset == "safe_safes"},
                subset=subset,
                meta={"harmful_category": row.get("harmful_category", ""),
                      "harmful_subcategory": row.get("harmful_subcategory", ""), "image_paths": [image_path]}))
    return _with_checked_images("VLGuard", stubs,
                                "--image_root should be the folder the 'image' fields are relative to (VLGuard test/).")


# ---------------------------------------------------------------------------------------------------------
# SIUO: generation set [{question_id, image, question, category, safety_warning, reference_answer}] and the
# multiple-choice set [{question_id, image, question, category, options{A..D}, correct_option}].

def load_siuo(path: str, image_root: str) -> RecordList:
    """path: siuo_gen.json. image_root: the folder of S-01.png, ... images."""
    table = _read_list(path, "SIUO rows")
    stubs = []
    for n, row in enumerate(table):
        where = f"{path}, row {n}"
        if "options" in row:
            raise BenchmarkError(f"{where}: this is a multiple-choice row; load it with benchmark siuo-mcqa")
        stubs.append(Record(
            id=f"siuo/{_field(row, 'question_id', where)}", prompt=_field(row, "question", where), images=[],
            labels={"safety_warning": _field(row, "safety_warning", where),
                    "reference_answer": _field(row, "reference_answer", where)},
            subset=_field(row, "category", where),
            meta={"image_paths": [os.path.join(image_root, _field(row, "image", where))]}))
    return _with_checked_images("SIUO", stubs)


def load_siuo_mcqa(path: str, image_root: str) -> RecordList:
    """path: siuo_mcqa.json. The prompt is our multiple-choice wording with the four options."""
    table = _read_list(path, "SIUO multiple-choice rows")
    stubs = []
    for n, row in enumerate(table):
        where = f"{path}, row {n}"
        options = _field(row, "options", where)
        if not isinstance(options, dict) or sorted(options) != list(MCQA_LETTERS):
            raise BenchmarkError(f"{where}: 'options' must have exactly the keys A, B, C, D")
        correct = _field(row, "correct_option", where)
        if correct not in MCQA_LETTERS:
            raise BenchmarkError(f"{where}: 'correct_option' must be one of A-D, got {correct!r}")
        question = _field(row, "question", where)
        listed = "\n".join(f"({k}) {options[k].strip()}" for k in MCQA_LETTERS)
        stubs.append(Record(
            id=f"siuo-mcqa/{_field(row, 'question_id', where)}",
            prompt=SIUO_MCQA_PROMPT.format(question=question, options=listed), images=[],
            labels={"correct_option": correct, "question": question},
            subset=_field(row, "category", where),
            meta={"image_paths": [os.path.join(image_root, _field(row, "image", where))]}))
    return _with_checked_images("SIUO", stubs)


def _with_checked_images(name: str, stubs: list[Record],
                         hint: str = "--image_root should be the folder the 'image' fields are relative to.") -> RecordList:
    sources = [list(r.meta["image_paths"]) for r in stubs]
    _check_images(name, [p for s in sources for p in s], hint)
    return RecordList(stubs, sources)


# ---------------------------------------------------------------------------------------------------------
# MOSSBench: {pid: {image, "short description", question, metadata{over: "type 1|2|3", ...}, pid, description}}.
# The 300 benign samples measure over-refusal; the contrast file holds harmful counterparts of the same images.

def load_mossbench(path: str, image_root: str, subset: str = "benign") -> RecordList:
    """path: images_information/information.json (benign) or the contrast file (subset="contrast").
    image_root: the folder the `image` fields ("images/1.png") are relative to (upstream data/)."""
    table = _read_json(path)
    if not isinstance(table, dict):
        raise BenchmarkError(f"{path}: expected a JSON object {{pid: sample}}")
    stubs = []
    for pid, row in table.items():
        where = f"{path}, sample {pid}"
        metadata = _field(row, "metadata", where)
        stubs.append(Record(
            id=f"mossbench-{subset}/{pid}", prompt=_field(row, "question", where), images=[],
            labels={"over_type": _field(metadata, "over", where + " metadata"), "harmful": subset == "contrast"},
            subset=metadata["over"],
            meta={"description": row.get("description", ""), "metadata": metadata,
                  "image_paths": [os.path.join(image_root, _field(row, "image", where))]}))
    return _with_checked_images("MOSSBench", stubs)


# ---------------------------------------------------------------------------------------------------------
# VLSBench: data.json, a list of {instruction_id, instruction, image_path, category, sub_category, source,
# image_description, safety_reason}, image_path relative to the data folder (the one holding data.json). The
# risk is in the image only: the instruction alone reads harmless (no visual safety information leaks into it).

def load_vlsbench(path: str, image_root: str | None = None) -> RecordList:
    """path: VLSBench's data.json. image_root: the folder the `image_path` fields are relative to (default: the
    folder of data.json, as released). The fields read are required; the others are kept when present (the first
    release had no image_description or safety_reason)."""
    table = _read_list(path, "VLSBench rows")
    root = os.path.dirname(os.path.abspath(path)) if image_root is None else image_root
    stubs = []
    for n, row in enumerate(table):
        where = f"{path}, row {n}"
        instruction = _field(row, "instruction", where)
        if not isinstance(instruction, str) or not instruction.strip():
            raise BenchmarkError(f"{where}: field 'instruction' must be non-empty text, got {instruction!r}")
        stubs.append(Record(
            id=f"vlsbench/{_field(row, 'instruction_id', where)}", prompt=instruction, images=[],
            labels={"safety_reason": row.get("safety_reason", ""),
                    "image_description": row.get("image_description", "")},
            subset=_field(row, "category", where),
            meta={"sub_category": row.get("sub_category", ""), "source": row.get("source", ""),
                  "image_paths": [os.path.join(root, _field(row, "image_path", where))]}))
    return _with_checked_images("VLSBench", stubs, "--image_root should be the folder the 'image_path' fields are "
                                                   "relative to (by default the folder of data.json).")


# ---------------------------------------------------------------------------------------------------------
# SafeTag-VL-3K test split: the data helper's loader (data/safetag.py) reads the released schema.

def load_safetag(path: str, image_root: str | None = None, split: str = "test") -> RecordList:
    from data import safetag    # imported here so eval works without it for the other benchmarks
    records = safetag.load_safetag(path, split=split, image_root=image_root)
    return RecordList.from_records(records)


# ---------------------------------------------------------------------------------------------------------
# The toy world (data/toy.py): drawn in code from (split, size, seed), no files. Its labels are the reward's
# (image_tag, text_tag, combine_tag) and its subsets the world's five, so the report scores the responses with the
# rule reward as train.py's held-out evaluation does (eval/metrics.py reward_metrics).

def load_toy(split: str = "test", size: int = TOY_PRESET["toy_eval_size"], seed: int = 0, toy_mix: str = "") \
        -> RecordList:
    """The records train.py evaluates a toy run on with --toy_eval_size=size --seed=seed --toy_mix=toy_mix (the
    preset: 300, seed 0, the world's own mix)."""
    from data import toy
    if size < 1:
        raise BenchmarkError(f"toy: the split size must be >= 1, got {size}")
    try:
        weights = toy.mix(toy_mix)
    except ValueError as e:
        raise BenchmarkError(f"toy: {e}") from None
    return RecordList.from_records(toy.records(split, size, seed, weights))


def read_prompt_file(path: str) -> str:
    """Read a prompt text file: the part between -----BEGIN PROMPT----- and -----END PROMPT----- when those
    markers exist (the format of the shared benchmark files), else the file minus leading '#' lines."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    begin, end = "-----BEGIN PROMPT-----", "-----END PROMPT-----"
    if begin in text:
        if end not in text:
            raise BenchmarkError(f"{path}: has {begin} but no {end}")
        return text.split(begin, 1)[1].split(end, 1)[0].strip("\n")
    lines = text.splitlines()
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    return "\n".join(lines).strip("\n")


# name -> loader; the CLI passes the keyword arguments each one accepts.
LOADERS = {
    "safetag": load_safetag,
    "mmsafetybench": load_mmsafetybench,
    "figstep": load_figstep,
    "vlguard": load_vlguard,
    "siuo": load_siuo,
    "siuo-mcqa": load_siuo_mcqa,
    "mossbench": load_mossbench,
    "mossbench-contrast": lambda path, image_root: load_mossbench(path, image_root, subset="contrast"),
    "vlsbench": load_vlsbench,
    "toy": load_toy,
}
