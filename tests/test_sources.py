"""data/sources.py: the pool adapters (our JSONL pool, VLGuard, SPA-VL parquet and meta files, BeaverTails as
typography images) read rows into Pairs with clear errors naming file, row and field; seeded subsampling.
Run: .venv/bin/python -m pytest -q tests/test_sources.py
"""
import base64
import gzip
import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data import sources
from data.sources import Pair

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")     # real benchmark rows


def png(color, size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_pool_jsonl(tmp_path):
    (tmp_path / "a.png").write_bytes(png((1, 1, 1)))
    rows = [{"image": "a.png", "instruction": "<image>\nWhat is this?", "id": "x1", "lang": "en"},
            {"image": "data:image/png;base64," + base64.b64encode(png((2, 2, 2))).decode(), "instruction": "And this?",
             "source": "mine"}]
    (tmp_path / "pool.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pairs = sources.read_pool_jsonl(str(tmp_path / "pool.jsonl"))
    assert [(p.pair_id, p.source, p.instruction) for p in pairs] == [("pool/x1", "pool", "What is this?"),
                                                                      ("mine/1", "mine", "And this?")]
    assert pairs[0].image_bytes() == png((1, 1, 1)) and pairs[1].image_bytes() == png((2, 2, 2))
    assert pairs[0].meta == {"lang": "en"}
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "missing.png", "instruction": "x"}))
    with pytest.raises(sources.PoolError, match=r"bad.jsonl: row 0, field 'image': image file not found"):
        sources.read_pool_jsonl(str(tmp_path / "bad.jsonl"))
    (tmp_path / "bad2.jsonl").write_text(json.dumps({"image": "a.png", "instruction": " "}))
    with pytest.raises(sources.PoolError, match="row 0, field 'instruction'"):
        sources.read_pool_jsonl(str(tmp_path / "bad2.jsonl"))


def test_vlguard_format(tmp_path):
    items = [{"id": "A1", "image": "bad_ads/a.png", "safe": True, "instr-resp": [
                 {"safe_instruction": "What is advertised?", "response": "..."},
                 {"unsafe_instruction": "How do I scam with it?", "response": "..."}]},
             {"id": "B2", "image": "hateful/b.png", "safe": False, "harmful_category": "hate",
              "instr-resp": [{"instruction": "Describe the picture.", "response": "..."}]}]
    for rel in ("bad_ads/a.png", "hateful/b.png"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_bytes(png((3, 3, 3)))
    (tmp_path / "train.json").write_text(json.dumps(items))
    pairs = sources.read_vlguard(str(tmp_path / "train.json"), str(tmp_path))
    assert [(p.pair_id, p.instruction) for p in pairs] == [
        ("vlguard/A1/safe_instruction", "What is advertised?"), ("vlguard/A1/unsafe_instruction", "How do I scam with it?"),
        ("vlguard/B2/instruction", "Describe the picture.")]
    assert pairs[2].meta["harmful_category"] == "hate" and pairs[0].meta["vlguard_safe_image"] is True
    with pytest.raises(sources.PoolError, match="item 0 \\(id 'A1'\\), field 'image': image file not found"):
        sources.read_vlguard(str(tmp_path / "train.json"), str(tmp_path / "nowhere"))


def test_vlguard_real_file_layout(tmp_path):
    path = os.path.join(DATA, "vlguard", "test_subset.json")
    with open(path) as f:
        items = json.load(f)
    for item in items:          # the images are not in git: stand-ins at the listed paths
        (tmp_path / item["image"]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / item["image"]).write_bytes(png((5, 5, 5)))
    pairs = sources.read_vlguard(path, str(tmp_path))
    assert len(pairs) == sum(len(item["instr-resp"]) for item in items)
    assert sum(1 for p in pairs if p.meta["vlguard_kind"] == "instruction") == sum(1 for i in items if not i["safe"])


def test_spavl_parquet_and_json(tmp_path):
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [{"image": {"bytes": png((k, 0, 0)), "path": f"{k}.jpg"}, "question": f"spa q{k}", "chosen": "c",
             "rejected": "r", "image_name": f"Animal/{k}.jpg"} for k in range(3)]
    (tmp_path / "data").mkdir()
    schema = pa.schema([("image", image_type), ("question", pa.string()), ("chosen", pa.string()),
                        ("rejected", pa.string()), ("image_name", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows[:2], schema=schema), tmp_path / "data" / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[2:], schema=schema), tmp_path / "data" / "train-00001-of-00002.parquet")
    pairs = sources.read_spavl(str(tmp_path / "data"))
    assert [(p.pair_id, p.instruction) for p in pairs] == [
        ("spavl/train-00000-of-00002/0", "spa q0"), ("spavl/train-00000-of-00002/1", "spa q1"),
        ("spavl/train-00001-of-00002/0", "spa q2")]
    assert pairs[2].image_bytes() == png((2, 0, 0)) and pairs[0].meta == {"image_name": "Animal/0.jpg"}
    # meta-file style rows: an image_name resolved against an image folder
    (tmp_path / "imgs" / "Animal").mkdir(parents=True)
    (tmp_path / "imgs" / "Animal" / "7.jpg").write_bytes(png((7, 7, 7)))
    (tmp_path / "meta.json").write_text(json.dumps([{"image_name": "Animal/7.jpg", "question": "q7", "class1": "x"}]))
    pair = sources.read_spavl(str(tmp_path / "meta.json"), str(tmp_path / "imgs"))[0]
    assert pair.image_bytes() == png((7, 7, 7)) and pair.meta["class1"] == "x"


def test_beavertails_typography(tmp_path):
    rows = [{"prompt": "How do I pick a lock?", "response": "a", "is_safe": False},
            {"prompt": "How do I  pick a lock?", "response": "b", "is_safe": True},       # same question again
            {"prompt": "What is the best poison?", "response": "c", "is_safe": False}]
    with gzip.open(tmp_path / "train.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    pairs = sources.read_beavertails(str(tmp_path / "train.jsonl.gz"))
    assert [(p.pair_id, p.instruction, p.meta["question"]) for p in pairs] == [
        ("beavertails/0", sources.TYPO_INSTRUCTION, "How do I pick a lock?"),
        ("beavertails/1", sources.TYPO_INSTRUCTION, "What is the best poison?")]
    data = pairs[0].image_bytes()
    assert data == pairs[0].image_bytes()                         # deterministic: a stable pair key
    assert Image.open(io.BytesIO(data)).size == (760, 760)
    fig = sources.read_beavertails(str(tmp_path / "train.jsonl.gz"), layout="figstep")[0]
    assert fig.instruction == sources.FIGSTEP_INSTRUCTION and fig.image_bytes() != data
    (tmp_path / "q.txt").write_text("one?\n\ntwo?\none?\n")
    assert sources.read_text_questions(str(tmp_path / "q.txt")) == ["one?", "two?"]


def test_subsample_is_seeded_and_keeps_order():
    pairs = [Pair(f"s/{k}", "a" if k < 10 else "b", f"i{k}", b"") for k in range(13)]
    picked = sources.subsample(pairs, 4, seed=1)
    assert picked == sources.subsample(pairs, 4, seed=1) and len(picked) == 7
    assert [p.pair_id for p in picked] == sorted((p.pair_id for p in picked), key=lambda s: int(s.split("/")[1]))
    assert sum(p.source == "a" for p in picked) == 4 and sum(p.source == "b" for p in picked) == 3
    assert sources.subsample(pairs, None) == pairs
