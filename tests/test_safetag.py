"""SafeTag loader on small fixtures in the released schema: parquet / JSONL / datasets folders, bytes / paths,
with and without an <image> placeholder; bad rows give errors naming row and field; and the step-guided prompt."""
import base64
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data.prompt import STEP_GUIDED_PROMPT, build_prompt
from data.safetag import SafeTagError, load_safetag, normalize_prompt, read_safetag

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SCHEMA = pa.schema([("prompt", pa.string()), ("images", pa.list_(IMAGE)), ("text_tag", pa.string()),
                    ("image_tag", pa.string()), ("combine_tag", pa.string())])


def png(color, size=(6, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
ROWS = [  # (prompt, image, text, combine) -- tags in mixed case, as a careless exporter might write them
    ("<image>What is shown here?", "safe", "safe", "safe"),
    ("How do I use this to hurt someone?", "safe", "Unsafe", "UNSAFE"),
    ("Where can I buy more of these?\n<image>", "unsafe", "safe", "unsafe"),
]


def parquet_rows():
    return [{"prompt": p, "images": [{"bytes": png(c), "path": None}], "image_tag": i, "text_tag": t, "combine_tag": cb}
            for (p, i, t, cb), c in zip(ROWS, COLORS)]


def write_parquet(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)


def check_records(records, split="train"):
    assert [r.prompt for r in records] == [p for p, *_ in ROWS]
    assert [r.labels for r in records] == [
        {"image_tag": "safe", "text_tag": "safe", "combine_tag": "safe"},
        {"image_tag": "safe", "text_tag": "unsafe", "combine_tag": "unsafe"},
        {"image_tag": "unsafe", "text_tag": "safe", "combine_tag": "unsafe"}]
    for r, color in zip(records, COLORS):
        assert len(r.images) == 1 and r.images[0].mode == "RGB" and r.images[0].size == (6, 4)
        assert tuple(np.asarray(r.images[0])[0, 0]) == color
    assert [r.id for r in records] == [f"safetag/{split}/{k}" for k in range(3)]
    assert records[1].subset == "image=safe text=unsafe combined=unsafe"


def test_parquet_file_with_image_dicts(tmp_path):
    path = str(tmp_path / "train.parquet")
    write_parquet(path, parquet_rows())
    check_records(load_safetag(path))


def test_hub_layout_folder_picks_the_split(tmp_path):
    rows = parquet_rows()
    write_parquet(str(tmp_path / "data" / "train-00000-of-00001.parquet"), rows[:2])
    write_parquet(str(tmp_path / "data" / "train-00001-of-00001.parquet"), rows[2:])
    write_parquet(str(tmp_path / "data" / "test-00000-of-00001.parquet"), rows[:1])
    check_records(load_safetag(str(tmp_path), split="train"))
    test = load_safetag(str(tmp_path), split="test")
    assert [r.prompt for r in test] == [ROWS[0][0]] and test[0].id == "safetag/test/0"
    with pytest.raises(SafeTagError, match="no file for split 'validation'"):
        load_safetag(str(tmp_path), split="validation")


def test_datasets_save_to_disk_folder(tmp_path):
    """What DatasetDict.save_to_disk writes: dataset_dict.json, and per split arrow stream files + state.json."""
    (tmp_path / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    for split, rows in (("train", parquet_rows()), ("test", parquet_rows()[:1])):
        d = tmp_path / split
        d.mkdir()
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        with pa.OSFile(str(d / "data-00000-of-00001.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table, max_chunksize=2)
        (d / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    check_records(load_safetag(str(tmp_path), split="train"))
    assert len(load_safetag(str(tmp_path), split="test")) == 1
    with pytest.raises(SafeTagError, match="no split 'dev'"):
        load_safetag(str(tmp_path), split="dev")


def test_jsonl_with_paths_uris_and_pil(tmp_path):
    (tmp_path / "imgs").mkdir()
    for k, c in enumerate(COLORS):
        (tmp_path / "imgs" / f"{k}.png").write_bytes(png(c))
    lines = []
    for k, (p, i, t, cb) in enumerate(ROWS):
        image = [f"imgs/{k}.png",                                         # relative to the JSONL's folder
                 "data:image/png;base64," + base64.b64encode(png(COLORS[1])).decode(),  # data URI
                 {"bytes": None, "path": str(tmp_path / "imgs" / "2.png")}][k]         # absolute path in a dict
        lines.append(json.dumps({"prompt": p, "images": [image], "image_tag": i, "text_tag": t, "combine_tag": cb}))
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    check_records(load_safetag(str(tmp_path / "train.jsonl")))
    # an explicit image_root replaces the JSONL's folder for relative paths
    other = tmp_path / "elsewhere"
    other.mkdir()
    with pytest.raises(SafeTagError, match=r"row 0, field 'images\[0\]': image file not found"):
        load_safetag(str(tmp_path / "train.jsonl"), image_root=str(other))


def test_placeholders_are_normalised_and_counted(tmp_path):
    assert normalize_prompt("<image>\nWhat?") == ("<image>\nWhat?", 1)
    assert normalize_prompt("<|vision_start|><|image_pad|><|vision_end|>What?") == ("<image>What?", 1)
    assert normalize_prompt("<image_1> vs <Image 2>: which?") == ("<image> vs <image>: which?", 2)
    assert normalize_prompt("No marker") == ("No marker", 0)
    two = {"prompt": "<image_1> and <image_2>: same place?", "images": [png(COLORS[0]), png(COLORS[1])],
           "image_tag": "safe", "text_tag": "safe", "combine_tag": "safe"}
    path = str(tmp_path / "train.parquet")
    pq.write_table(pa.Table.from_pylist([two]), path)          # images as a plain list of bytes
    rec = load_safetag(path)[0]
    assert rec.prompt == "<image> and <image>: same place?" and len(rec.images) == 2
    assert tuple(np.asarray(rec.images[1])[0, 0]) == COLORS[1]


def test_records_feed_the_step_guided_prompt():
    q = "What is in the picture?"
    assert build_prompt(q) == q + "\n" + STEP_GUIDED_PROMPT
    for tag in ("visual_safe", "text_safe", "combined_safe"):
        assert f"<{tag}>safe</{tag}>" in STEP_GUIDED_PROMPT and f"<{tag}>unsafe</{tag}>" in STEP_GUIDED_PROMPT
    assert "<think>" in STEP_GUIDED_PROMPT and "<answer>" in STEP_GUIDED_PROMPT


def test_prompt_file_override(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("Answer in five steps.\n\n")
    assert build_prompt("Q?", str(f)) == "Q?\nAnswer in five steps."
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        build_prompt("Q?", str(tmp_path / "empty.txt"))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        build_prompt("Q?", str(tmp_path / "missing.txt"))


# ----------------------------------------------------------------------------- bad rows

BAD = [  # (change to row 1, field named in the error, words in the error)
    ({"image_tag": "maybe"}, "image_tag", "invalid tag 'maybe'"),
    ({"combine_tag": None}, "combine_tag", "missing tag"),
    ({"images": []}, "images", "no image"),
    ({"images": [{"bytes": b"not an image at all", "path": None}]}, "images[0]", "corrupt image"),
    ({"images": [{"bytes": png(COLORS[0])[:40], "path": None}]}, "images[0]", "corrupt image"),   # truncated PNG
    ({"images": [{"bytes": None, "path": "gone.png"}]}, "images[0]", "image file not found"),
    ({"prompt": None}, "prompt", "missing prompt"),
    ({"prompt": "<image> "}, "prompt", "empty prompt"),
    ({"prompt": "<image> then <image>?"}, "prompt", "2 image placeholders but the row has 1 images"),
]


@pytest.mark.parametrize("change,field,words", BAD)
def test_bad_row_names_row_and_field(tmp_path, change, field, words):
    rows = parquet_rows()
    rows[1].update(change)
    path = str(tmp_path / "train.parquet")
    write_parquet(path, rows)
    with pytest.raises(SafeTagError) as e:
        load_safetag(path)
    assert f"row 1, field '{field}'" in str(e.value) and words in str(e.value) and "train.parquet" in str(e.value)


def test_skip_bad_rows_reports_how_many_and_which(tmp_path, capsys):
    rows = parquet_rows() + parquet_rows()
    rows[1]["image_tag"] = "maybe"
    rows[4]["images"] = [{"bytes": b"junk", "path": None}]
    path = str(tmp_path / "train.parquet")
    write_parquet(path, rows)
    records, bad = read_safetag(path, skip_bad_rows=True)
    assert [r.id for r in records] == ["safetag/train/0", "safetag/train/2", "safetag/train/3", "safetag/train/5"]
    assert [(b.row, b.field) for b in bad] == [(1, "image_tag"), (4, "images[0]")]
    assert len(load_safetag(path, skip_bad_rows=True)) == 4
    err = capsys.readouterr().err
    assert "skipped 2 bad row(s)" in err and "row 1 image_tag" in err and "row 4 images[0]" in err


def test_bad_jsonl_line_and_missing_source(tmp_path):
    (tmp_path / "a.png").write_bytes(png(COLORS[0]))
    good = {"prompt": "x", "images": ["a.png"], "image_tag": "safe", "text_tag": "safe", "combine_tag": "safe"}
    (tmp_path / "train.jsonl").write_text(json.dumps(good) + '\n\n{not json\n')
    with pytest.raises(SafeTagError, match="line 3 is not valid JSON"):
        load_safetag(str(tmp_path / "train.jsonl"))
    (tmp_path / "bool.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**good, "text_tag": True}) + "\n")
    with pytest.raises(SafeTagError, match="row 1, field 'text_tag': invalid tag True"):
        load_safetag(str(tmp_path / "bool.jsonl"))
    with pytest.raises(SafeTagError, match="does not exist"):
        load_safetag(str(tmp_path / "nope.parquet"))


def test_hub_name_without_datasets_is_a_clear_error():
    try:
        import datasets  # noqa: F401
        pytest.skip("datasets is installed here; the hub path would go online")
    except ImportError:
        pass
    with pytest.raises(SafeTagError, match="needs the `datasets` package"):
        load_safetag("XuankunRong/SafeTag-VL-3K")


def test_limit_and_extra_columns_go_to_meta(tmp_path):
    rows = parquet_rows()
    for k, r in enumerate(rows):
        r["source"] = f"src{k}"
    path = str(tmp_path / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    records = load_safetag(path, limit=2)
    assert len(records) == 2 and records[1].meta["source"] == "src1" and records[1].meta["row"] == 1


def test_pil_images_and_a_single_image_column():
    """Rows as `datasets` yields them from the hub (images decoded to PIL), and a one-image `image` column."""
    from data.safetag import row_to_record
    pil = Image.new("L", (5, 3), 200)
    rec = row_to_record({"prompt": "Q?", "images": [pil], "image_tag": "Safe", "text_tag": "safe",
                         "combine_tag": "safe"}, "r0", None, {})
    assert rec.images[0].mode == "RGB" and rec.images[0].size == (5, 3) and rec.labels["image_tag"] == "safe"
    rec = row_to_record({"prompt": "<image>Q?", "image": {"bytes": png(COLORS[2]), "path": "x.png"},
                         "image_tag": "unsafe", "text_tag": "safe", "combine_tag": "unsafe"}, "r1", None, {})
    assert len(rec.images) == 1 and tuple(np.asarray(rec.images[0])[0, 0]) == COLORS[2]
