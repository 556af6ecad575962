"""data/files.py: a JSONL file survives a torn last line, JSON is replaced whole or not at all."""
import json
import os

import pytest

from runtime.files import append_jsonl, read_jsonl, write_json


def test_jsonl_survives_a_torn_last_line(tmp_path):
    path = str(tmp_path / "o.jsonl")
    append_jsonl(path, [{"id": "a"}, {"id": "b"}])
    with open(path, "a") as f:
        f.write('{"id": "c", "resp')               # a crash in the middle of a write
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b"]
    append_jsonl(path, [{"id": "c"}])              # the torn line was cut, so this lands on its own line
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b", "c"]
    with open(path, "w") as f:
        f.write('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        read_jsonl(path)


def test_write_json_replaces_the_file_whole(tmp_path, monkeypatch):
    path = str(tmp_path / "settings.json")
    write_json(path, {"name": "café", "where": tmp_path})      # non-ASCII kept, a path written as str
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert "café" in text and json.loads(text) == {"name": "café", "where": str(tmp_path)}

    def crash(src, dst):
        raise OSError("disk gone")
    monkeypatch.setattr(os, "replace", crash)                   # a crash between writing and renaming
    with pytest.raises(OSError, match="disk gone"):
        write_json(path, {"name": "new"})
    with open(path, encoding="utf-8") as f:
        assert json.load(f)["name"] == "café"                   # the old file is intact
