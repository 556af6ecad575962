"""A damaged model directory, as a user meets it through `python sample.py` and `python -m eval`: a truncated or
corrupted model.safetensors, a malformed config.json. Both CLIs exit 2 with one line that names the file, never a
traceback. Run: .venv/bin/python -m pytest -q tests/test_cli_errors.py
"""
import os
import shutil
import subprocess
import sys

import pytest

import sample
from data import toy
from eval.__main__ import main as eval_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """The toy world's untrained checkpoint (weights, tokenizer, processor) and one of its pictures."""
    path = tmp_path_factory.mktemp("toy") / "model"
    toy.build_checkpoint(str(path), seed=0)
    image = path.parent / "toy.png"
    toy.records("test", 1, seed=0)[0].images[0].save(image)
    return path, str(image)


def damaged(good_dir, tmp_path, what: str):
    """A copy of the checkpoint with one file damaged; returns (dir, the damaged file, what the error says)."""
    path = tmp_path / what
    shutil.copytree(good_dir, path)
    if what == "truncated_weights":
        file, data = path / "model.safetensors", (path / "model.safetensors").read_bytes()
        file.write_bytes(data[:len(data) // 3])
        return path, file, "is not a readable safetensors file"
    if what == "corrupted_weights":
        file = path / "model.safetensors"
        data = bytearray(file.read_bytes())
        data[8:24] = b"#" * 16        # the JSON header after its 8-byte length
        file.write_bytes(bytes(data))
        return path, file, "is not a readable safetensors file"
    file = path / "config.json"
    file.write_text(file.read_text()[:-20])    # cut short: malformed JSON
    return path, file, "is not valid JSON"


@pytest.mark.parametrize("what", ["truncated_weights", "corrupted_weights", "malformed_config"])
def test_both_clis_name_the_damaged_file(good, tmp_path, capsys, what):
    good_dir, image = good
    path, file, says = damaged(good_dir, tmp_path, what)
    assert sample.main(["--model", str(path), "--image", image, "--prompt", "What is this?", "--group_size", "1",
                        "--max_new_tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert f"error: {file} {says}" in err and "tokenizer" not in err
    assert eval_main(["--model", str(path), "--benchmark", "toy", "--toy_size", "1", "--max_new_tokens", "2",
                      "--out", str(tmp_path / "eval"), "--no_progress"]) == 2
    assert f"error: {file} {says}" in capsys.readouterr().err


def test_processes_exit_2_without_a_traceback(good, tmp_path):
    """The same as the user runs it: exit status 2, one error line naming the file."""
    good_dir, image = good
    path, file, says = damaged(good_dir, tmp_path, "truncated_weights")
    for cmd in (["sample.py", "--model", str(path), "--image", image, "--prompt", "What is this?"],
                ["-m", "eval", "--model", str(path), "--benchmark", "toy", "--toy_size", "1", "--out",
                 str(tmp_path / "eval"), "--no_progress"]):
        r = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert r.returncode == 2, r.stderr
        assert f"error: {file} {says}" in r.stderr and "Traceback" not in r.stderr
