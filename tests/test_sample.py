"""sample.py: the sampling math (exact inverse-CDF draws, uniforms), bad input caught before any compute, and the
CLI. The engine that sample.generate runs is tested in tests/test_engine.py.
Run: .venv/bin/python -m pytest -q tests/test_sample.py
"""
import os
import subprocess
import sys

import pytest
import torch

from rollout import randomness

from rollout import sampling
import model
import sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tiny_vlm):
    return tiny_vlm.build("qwen3_vl")


@pytest.fixture(scope="module")
def prompts(tiny, tiny_vlm):
    return tiny_vlm.prompts(tiny[1])


# ----------------------------------------------------------------------------- sampling

def test_inverse_cdf_sampling_is_exact():
    """With n evenly spaced uniforms, token v is drawn n * p_v times (+-1): the sampler is the exact CDF inverse,
    after temperature, top-k and top-p (worked by hand: probs .5 .3 .15 .05)."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 1000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n

    def counts(temperature, top_k=0, top_p=1.0):
        logits = probs.log().expand(n, 4)
        tokens, _ = sampling.sample(logits, u, temperature, top_k, top_p)
        return torch.bincount(tokens, minlength=4).tolist()

    assert counts(1.0) == [500, 300, 150, 50]
    assert counts(1.0, top_p=0.8) == [625, 375, 0, 0]        # .5 + .3 reaches .8: keep 2, renormalise
    assert counts(1.0, top_p=0.81) == [526, 316, 158, 0]    # needs the third token too
    assert counts(1.0, top_k=1) == [1000, 0, 0, 0]
    sharp = probs ** 2 / (probs ** 2).sum()                 # temperature 0.5 squares the probabilities
    assert all(abs(c - n * p) <= 1 for c, p in zip(counts(0.5), sharp.tolist()))
    _, lp = sampling.sample(probs.log().expand(2, 4), u[:2], 1.0, top_k=1)
    assert torch.allclose(lp, probs.log()[0].expand(2))     # log-prob of the unfiltered distribution


def test_uniforms_are_uniform_and_independent():
    keys = randomness.row_keys(seed=0, num_prompts=50, group_size=8)
    assert len(set(keys)) == 400
    u = torch.tensor([randomness.uniforms(keys, step) for step in range(50)], dtype=torch.float64)  # (steps, rows)
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01
    hist = torch.histc(u, bins=10, min=0, max=1)
    assert float(hist.min()) > 0.9 * 2000 and float(hist.max()) < 1.1 * 2000
    a, b = u[:-1].flatten(), u[1:].flatten()  # consecutive steps of a row, and neighbouring rows
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.03
    assert abs(float(torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1])) < 0.03
    # prompt seeds: row (i, j) depends on (prompt_seeds[i], j) only
    assert randomness.row_keys(0, 2, 3, prompt_seeds=[9, 4])[3:] == randomness.row_keys(123, 1, 3, prompt_seeds=[4])


# ----------------------------------------------------------------------------- bad input

def test_bad_input_fails_before_any_compute(tiny, prompts, monkeypatch):
    net, _ = tiny
    monkeypatch.setattr(type(net), "forward", lambda *a, **k: pytest.fail("the model ran"))
    p0, p1 = prompts[0], prompts[1]

    def check(match, ps=(p0, p1), **kw):
        args = dict(group_size=2, max_new_tokens=4) | kw
        with pytest.raises(ValueError, match=match):
            sample.generate(net, list(ps), **args)

    check("group_size", group_size=0)
    check("max_new_tokens", max_new_tokens=0)
    check("non-empty list", ps=())
    check("temperature", temperature=-1.0)
    check("top_p", top_p=0.0)
    check("prompt_seeds", prompt_seeds=[1])
    monkeypatch.setattr(net.config.text, "max_position_embeddings", 20)
    check("prompt 0 has 32 tokens, longer than the model's context of 20")
    monkeypatch.setattr(net.config.text, "max_position_embeddings", p0["input_ids"].numel() + 2)
    check("prompt 0: .* exceed the model's context", max_new_tokens=5)
    monkeypatch.undo()
    monkeypatch.setattr(type(net), "forward", lambda *a, **k: pytest.fail("the model ran"))
    ids = p0["input_ids"]
    first_pad = int((ids == net.config.image_token_id).nonzero()[0])
    one_short = dict(p0, input_ids=ids[torch.arange(ids.numel()) != first_pad])
    check("prompt 1 holds 5 image placeholder tokens but its images give 6 features", ps=(p1, one_short))
    check("image placeholder tokens but no image", ps=(dict(p0, pixel_values=None, image_grid_thw=None),))
    check("together", ps=(dict(p0, image_grid_thw=None),))
    check("patches", ps=(dict(p0, pixel_values=p0["pixel_values"][:-1]),))
    check("token ids", ps=(dict(p1, input_ids=p1["input_ids"] + 10_000),))
    check("pad_token_id", pad_token_id=-1)


# ----------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def checkpoint(tiny, tiny_vlm, tmp_path_factory):
    net, proc = tiny
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    model.save(net, path)
    proc.save(str(path))
    img = path.parent / "cat.png"
    tiny_vlm.image(48, 64, 7).save(img)
    return str(path), str(img)


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_cli_end_to_end(checkpoint):
    path, img = checkpoint
    out = run_cli("--model", path, "--image", img, "--prompt", "Is this safe?", "--group_size", "2", "--max_new_tokens", "6",
                  "--seed", "1", "--labels", "image_tag=safe,text_tag=unsafe,combine_tag=unsafe")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("=== sample ") == 2 and out.stdout.count("--- reward ") == 2
    missing = run_cli("--model", path, "--image", img + ".nope", "--prompt", "Is this safe?")
    assert missing.returncode == 2 and "file not found" in missing.stderr and "Traceback" not in missing.stderr


def test_cli_errors(checkpoint, tmp_path, capsys):
    path, img = checkpoint
    no_tok = tmp_path / "no_tokenizer"
    no_tok.mkdir()
    for name in os.listdir(path):
        if not name.startswith("tokenizer"):
            (no_tok / name).write_bytes(open(os.path.join(path, name), "rb").read())
    assert sample.main(["--model", str(no_tok), "--image", img, "--prompt", "hi"]) == 2
    assert "no tokenizer" in capsys.readouterr().err
    assert sample.main(["--model", path, "--image", img, "--prompt", "hi", "--labels", "image_tag=safe"]) == 2
    assert "missing text_tag, combine_tag" in capsys.readouterr().err
    assert sample.main(["--model", path, "--image", img, "--prompt", "hi", "--group_size", "0"]) == 2
    assert "group_size" in capsys.readouterr().err
    assert sample.main(["--model", path, "--prompt", "hi", "--no_step_guided", "--group_size", "2", "--temperature", "0",
                        "--max_new_tokens", "3"]) == 0  # text only, greedy: both samples equal
    printed = capsys.readouterr().out.split("=== sample ")
    assert printed[1].split("\n", 1)[1] == printed[2].split("\n", 1)[1]
