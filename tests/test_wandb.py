"""--wandb=true: a short toy run logs to an offline wandb run under <out_dir>/wandb whose history holds the same step
metrics as metrics.jsonl; without wandb installed, or when wandb cannot start, train.py exits 2 saying what to do.
Run: .venv/bin/python -m pytest -q tests/test_wandb.py
"""
import glob
import json
import os
import struct
import subprocess
import sys
import types

import pytest

from runtime import logs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--max_steps=2", "--prompts_per_step=2", "--mini_batch_prompts=2", "--group_size=2", "--toy_train_size=8",
        "--toy_eval_size=2", "--warmstart_steps=2", "--max_new_tokens=8", "--eval_batch_size=2", "--threads=1"]


def wandb_history(run_file: str) -> list[dict]:
    """The history rows of a wandb run file (run-ID.wandb): LevelDB-log framing (a 7-byte file header, then records
    of 7-byte headers [crc32 u32, length u16, type u8] in 32 KiB blocks; type 1 a whole record, 2/3/4 its first,
    middle and last pieces) around wandb's protobuf Record messages."""
    from wandb.proto import wandb_internal_pb2
    data, block = open(run_file, "rb").read(), 32768
    assert data[:4] == b":W&B", run_file
    rows, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:          # no room for a header: the rest of the block is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_offline_run_holds_the_step_metrics(tmp_path):
    out = str(tmp_path / "run")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    r = subprocess.run([sys.executable, "train.py", "--wandb=true", "--wandb_project=safegrpo-test", *TINY,
                        f"--out_dir={out}"], capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    run_files = glob.glob(os.path.join(out, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(run_files) == 1, os.listdir(out)
    history = {row["_step"]: row for row in wandb_history(run_files[0])}
    steps = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [s["step"] for s in steps] == [1, 2] and sorted(history) == [1, 2]
    for s in steps:
        for key in ("reward", "format", "kl", "response_len", "lr"):
            assert history[s["step"]][key] == pytest.approx(s[key], abs=1e-6), key   # metrics.jsonl rounds to 6


def test_missing_wandb_is_a_clear_error(tmp_path):
    """wandb hidden from the import system, as on a machine without it."""
    script = ("import runpy, sys; sys.modules['wandb'] = None; sys.argv = ['train.py'] + sys.argv[1:]; "
              "runpy.run_path('train.py', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", script, "--wandb=true", *TINY, f"--out_dir={tmp_path / 'run'}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "error: --wandb=true needs the wandb package" in r.stderr and "pip install" in r.stderr
    assert "Traceback" not in r.stderr


def test_wandb_that_cannot_start_says_what_to_do(tmp_path, monkeypatch):
    def init(**kwargs):
        raise RuntimeError("No API key configured. Use `wandb login` to log in.")
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    with pytest.raises(RuntimeError, match="No API key configured.*WANDB_MODE=offline"):
        logs.MetricsLog(str(tmp_path), enabled=True, use_wandb=True, wandb_project="p", config={})
