"""SafeTag-VL-3K loader: rows of (prompt, images, text_tag, image_tag, combine_tag) -> `Record`s.

Reads a parquet file, a JSONL file (+ image folder), a folder of those (hub layout `data/train-*.parquet`,
or `train.parquet`), a `datasets` save_to_disk folder (its arrow files, read with pyarrow), or a hub name
when the `datasets` package happens to be installed. Check a file with
    python -m data.safetag /data/SafeTag-VL-3K --split test
"""
import argparse
import base64
import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass
from glob import glob

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from data.record import Record
from rewards import LABEL_KEYS

TAG_FIELDS = tuple(LABEL_KEYS.values())     # image_tag, text_tag, combine_tag: the columns rewards.py reads
TAG_VALUES = ("safe", "unsafe")
IMAGE_MARKER = "<image>"     # the marker model/processor.py's Processor.encode places images at
# Other spellings of an image placeholder seen in VLM datasets; all become IMAGE_MARKER.
MARKER_RE = re.compile(r"<\|vision_start\|>\s*<\|image_pad\|>\s*<\|vision_end\|>|<\|image_pad\|>|<\|image\|>"
                       r"|<image(?:[ _]?\d+)?>", re.IGNORECASE)
DATA_EXTS = (".parquet", ".jsonl", ".json", ".arrow")


class SafeTagError(ValueError):
    """A row or file that cannot be read; the message names the file, row and field."""


@dataclass
class BadRow:
    file: str
    row: int        # index of the row within the split (0-based, counting every row read)
    field: str
    message: str


class RowError(Exception):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field, self.message = field, message


# ----------------------------------------------------------------------------- images

def image_item_bytes(item, image_root: str | None, field: str = "images"):
    """One image value as stored by any of the formats -> encoded bytes, or a PIL image as is.

    Accepts raw bytes, {"bytes": ..., "path": ...} (how `datasets` stores an Image feature; bytes win),
    a path (absolute, or relative to image_root), a data: URI with base64 content, or a PIL image."""
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, dict):
        if item.get("bytes") is not None:
            item = item["bytes"]
        elif item.get("path"):
            item = item["path"]
        else:
            raise RowError(field, f"image dict has neither bytes nor path (keys: {sorted(item)})")
    if isinstance(item, (bytes, bytearray, memoryview)):
        if len(item) == 0:
            raise RowError(field, "image bytes are empty")
        return bytes(item)
    if isinstance(item, str):
        if item.startswith("data:"):
            try:
                return base64.b64decode(item.split(",", 1)[1], validate=True)
            except Exception as e:
                raise RowError(field, f"bad base64 data URI: {e}") from None
        path = item if os.path.isabs(item) or image_root is None else os.path.join(image_root, item)
        if not os.path.isfile(path):
            raise RowError(field, f"image file not found: {path!r} (image root: {image_root!r})")
        with open(path, "rb") as f:
            return f.read()
    raise RowError(field, f"cannot read an image from a value of type {type(item).__name__}")


def decode_image(item, image_root: str | None, field: str = "images") -> Image.Image:
    """Decode fully (so a truncated file fails here, not in a training step) with the project's one image loader,
    model/processor.py's load_image: EXIF orientation applied, then RGB, as sample.py and eval see images."""
    from model.processor import load_image     # pulls in torch and transformers: only when pixels are decoded
    data = image_item_bytes(item, image_root, field)
    try:
        return load_image(data, what="corrupt image")
    except ValueError as e:
        raise RowError(field, str(e)) from None


# ----------------------------------------------------------------------------- rows

def normalize_prompt(prompt: str) -> tuple[str, int]:
    """Rewrite every image placeholder spelling to IMAGE_MARKER; returns (prompt, number of markers)."""
    prompt, n = MARKER_RE.subn(IMAGE_MARKER, prompt)
    return prompt, n


def parse_tag(row: dict, field: str) -> str:
    if field not in row or row[field] is None:
        raise RowError(field, "missing tag")
    value = row[field]
    if not isinstance(value, str) or value.strip().lower() not in TAG_VALUES:
        raise RowError(field, f"invalid tag {value!r} (expected 'safe' or 'unsafe')")
    return value.strip().lower()


def tag_combination(labels: dict) -> str:
    """"image=safe text=unsafe combined=unsafe": the key the summaries count by."""
    return f"image={labels['image_tag']} text={labels['text_tag']} combined={labels['combine_tag']}"


def row_to_record(row: dict, rid: str, image_root: str | None, extra_meta: dict) -> Record:
    prompt = row.get("prompt")
    if not isinstance(prompt, str):
        raise RowError("prompt", "missing prompt" if prompt is None else f"prompt is a {type(prompt).__name__}, not text")
    prompt, n_markers = normalize_prompt(prompt)
    if not prompt.replace(IMAGE_MARKER, "").strip():
        raise RowError("prompt", "empty prompt")
    labels = {f: parse_tag(row, f) for f in TAG_FIELDS}
    field = "images" if "images" in row else "image"     # tolerate a single-image `image` column
    items = row.get(field)
    if items is None or (isinstance(items, (list, tuple)) and len(items) == 0):
        raise RowError("images", "no image (SafeTag rows pair every question with an image)")
    if not isinstance(items, (list, tuple)):
        items = [items]
    images = [decode_image(item, image_root, f"{field}[{k}]") for k, item in enumerate(items)]
    # Images are placed either way: at the markers, or (no marker) before the text by Processor.encode.
    if n_markers and n_markers != len(images):
        raise RowError("prompt", f"prompt has {n_markers} image placeholders but the row has {len(images)} images")
    meta = dict(extra_meta)
    meta.update({k: v for k, v in row.items() if k not in ("prompt", "images", "image") + TAG_FIELDS
                 and not isinstance(v, (bytes, bytearray))})
    return Record(id=rid, prompt=prompt, images=images, labels=labels, subset=tag_combination(labels), meta=meta)


# ----------------------------------------------------------------------------- files

def iter_file_rows(path: str):
    """Rows of one data file as dicts, streamed (parquet in batches, arrow stream or file, JSONL, JSON list)."""
    if path.endswith(".parquet"):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            yield from batch.to_pylist()
    elif path.endswith(".arrow"):
        with pa.memory_map(path) as source:
            try:
                reader = pa.ipc.open_stream(source)       # what `datasets` writes
            except pa.ArrowInvalid:
                source.seek(0)
                reader = pa.ipc.open_file(source)
            batches = reader if hasattr(reader, "__iter__") else (reader.get_batch(i) for i in range(reader.num_record_batches))
            for batch in batches:
                yield from batch.to_pylist()
    elif path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise SafeTagError(f"{path}: line {lineno} is not valid JSON: {e}") from None
    elif path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, list):
            raise SafeTagError(f"{path}: expected a JSON list of rows, got a {type(data).__name__}")
        yield from data
    else:
        raise SafeTagError(f"{path}: unsupported file type (expected one of {', '.join(DATA_EXTS)})")


def _split_matches(path: str, split: str) -> bool:
    name = os.path.basename(path)
    return bool(re.match(rf"^{re.escape(split)}([-_.].*)?\.(parquet|jsonl|json|arrow)$", name)) \
        or os.path.basename(os.path.dirname(path)) == split


def resolve_files(source: str, split: str) -> list[str]:
    """The data files holding `split` of a local file or folder, sorted (shards in order)."""
    if os.path.isfile(source):
        return [source]
    if os.path.isfile(os.path.join(source, "dataset_dict.json")):      # datasets.DatasetDict.save_to_disk
        with open(os.path.join(source, "dataset_dict.json")) as f:
            splits = json.load(f).get("splits", [])
        if split not in splits:
            raise SafeTagError(f"{source}: no split {split!r} in this datasets folder (splits: {splits})")
        source = os.path.join(source, split)
    if os.path.isfile(os.path.join(source, "state.json")):             # datasets.Dataset.save_to_disk
        with open(os.path.join(source, "state.json")) as f:
            names = [d["filename"] for d in json.load(f).get("_data_files", [])]
        files = [os.path.join(source, n) for n in names] or sorted(glob(os.path.join(source, "*.arrow")))
        if not files:
            raise SafeTagError(f"{source}: datasets folder without arrow files")
        return files
    found = sorted(p for ext in DATA_EXTS for p in glob(os.path.join(source, "**", "*" + ext), recursive=True))
    files = [p for p in found if _split_matches(p, split)]
    if not files:
        listing = ", ".join(os.path.relpath(p, source) for p in found[:10]) or "no data files"
        raise SafeTagError(f"{source}: no file for split {split!r} (looked for {split}.parquet, {split}-*.parquet, "
                           f"{split}/*.parquet and the same for .jsonl/.json/.arrow; found: {listing})")
    return files


def _hub_rows(name: str, split: str):
    try:
        import datasets  # optional: only for hub names
    except ImportError:
        raise SafeTagError(
            f"{name!r} is not a local file or folder. Loading a hub dataset needs the `datasets` package "
            f"(pip install datasets); or download it first, e.g. `huggingface-cli download --repo-type dataset "
            f"{name} --local-dir DIR`, and pass DIR") from None
    return iter(datasets.load_dataset(name, split=split))


def read_safetag(source: str, split: str = "train", image_root: str | None = None, skip_bad_rows: bool = False,
                 limit: int | None = None) -> tuple[list[Record], list[BadRow]]:
    """Records of one split plus the rows skipped (always empty unless skip_bad_rows)."""
    if os.path.exists(source):
        files = resolve_files(source, split)
        streams = [(f, iter_file_rows(f)) for f in files]
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        streams = [(f"{source}[{split}]", _hub_rows(source, split))]
    else:
        raise SafeTagError(f"SafeTag source {source!r} does not exist")
    records, bad, row = [], [], 0
    for path, rows in streams:
        if limit is not None and len(records) >= limit:
            break
        # paths inside a file are relative to image_root, else to the file's own folder
        root = image_root if image_root is not None else (os.path.dirname(os.path.abspath(path)) if os.path.exists(path) else None)
        for row_in_file, r in enumerate(rows):
            if limit is not None and len(records) >= limit:
                break
            try:
                if not isinstance(r, dict):
                    raise RowError("row", f"expected an object, got {type(r).__name__}")
                meta = {"split": split, "file": path, "row": row}
                records.append(row_to_record(r, f"safetag/{split}/{row}", root, meta))
            except RowError as e:
                where = f"{path}: row {row}" + (f" (row {row_in_file} of this file)" if len(streams) > 1 else "")
                if not skip_bad_rows:
                    raise SafeTagError(f"{where}, field '{e.field}': {e.message}") from None
                bad.append(BadRow(path, row, e.field, e.message))
            row += 1
    return records, bad


def load_safetag(source: str, split: str = "train", image_root: str | None = None, skip_bad_rows: bool = False,
                 limit: int | None = None) -> list[Record]:
    """Load one split as `Record`s (labels image_tag/text_tag/combine_tag in {"safe", "unsafe"}).

    A bad row (missing or corrupt image, invalid tag, ...) raises SafeTagError naming the row and field;
    skip_bad_rows=True skips such rows and prints how many and which to stderr."""
    records, bad = read_safetag(source, split, image_root, skip_bad_rows, limit)
    if bad:
        print(f"SafeTag {source} [{split}]: skipped {len(bad)} bad row(s): "
              + "; ".join(f"row {b.row} {b.field}: {b.message}" for b in bad[:20])
              + (f"; ... and {len(bad) - 20} more" if len(bad) > 20 else ""), file=sys.stderr)
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description="Load a SafeTag split and print its counts per tag combination.")
    p.add_argument("source", help="parquet/JSONL file, folder, datasets save_to_disk folder, or hub name")
    p.add_argument("--split", default="train", help="split name (train or test)")
    p.add_argument("--image_root", default=None, help="folder that relative image paths are resolved against")
    p.add_argument("--skip_bad_rows", action="store_true", help="skip unreadable rows instead of stopping")
    args = p.parse_args(argv)
    try:
        records = load_safetag(args.source, args.split, args.image_root, args.skip_bad_rows)
    except (SafeTagError, OSError) as e:
        sys.exit(f"error: {e}")
    counts = Counter(r.subset for r in records)
    print(f"{len(records)} records in {args.source} [{args.split}]")
    for combo, n in sorted(counts.items()):
        print(f"  {combo:<45} {n:>6}")


if __name__ == "__main__":
    main()
