"""The trained model is a model: after a short toy run, <out_dir>/final/ and a checkpoint's policy/ are complete Hugging
Face directories. transformers' AutoProcessor and model class load them as they are and decode greedily the same
tokens as our engine; `python sample.py` and `python -m eval --benchmark toy` (the README's next steps) run on them,
and the toy benchmark reproduces the run's own held-out metrics. The same for a run started from a checkpoint that
transformers wrote (Qwen2.5-VL). Run: .venv/bin/python -m pytest -q tests/test_final_model.py
"""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import model
import sample
import train
from runtime import checkpoints
from data import toy

pytestmark = pytest.mark.slow  # toy runs through train.main; CI runs them (pytest -m slow)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A toy run of a few seconds whose greedy responses already have the paper's format (40 warm-start updates) and
# stop on <|im_end|> before max_new_tokens, so that stopping is compared too.
TOY_RUN = ["--max_steps=2", "--prompts_per_step=4", "--mini_batch_prompts=4", "--group_size=2",
           "--toy_train_size=16", "--toy_eval_size=8", "--warmstart_steps=40", "--max_new_tokens=80",
           "--eval_batch_size=8", "--threads=1"]
# Besides the weights: what transformers' processor and generate read.
COMPLETE = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "preprocessor_config.json", "generation_config.json")


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("toy_run"))
    summary = train.main(TOY_RUN + [f"--out_dir={out}"])
    return out, summary


@pytest.fixture(scope="module")
def qwen25_run(tmp_path_factory):
    """One GRPO step from a tiny Qwen2.5-VL written by transformers' own save_pretrained (model, tokenizer, image
    processor), on toy-world prompts."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    from model.tokenizer import build_tokenizer, vision_token_ids
    from tiny import scramble_, tiny_qwen2_5vl_hf_dict
    ckpt = str(tmp_path_factory.mktemp("hf_qwen2_5_vl"))
    tok = build_tokenizer(toy.corpus()[:200], vocab_size=400)
    torch.manual_seed(0)
    hf = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**tiny_qwen2_5vl_hf_dict(vocab_size=len(tok),
                                                                                      **vision_token_ids(tok))))
    scramble_(hf, seed=1).save_pretrained(ckpt)   # its generation_config.json names Qwen's eos id 151645, not ours
    tok.save_pretrained(ckpt)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16).save_pretrained(ckpt)
    out = str(tmp_path_factory.mktemp("qwen25_run"))
    train.main([f"--model={ckpt}", "--data=toy", f"--out_dir={out}", "--toy_train_size=8", "--toy_eval_size=4",
                "--step_guided=false", "--max_steps=1", "--prompts_per_step=2", "--mini_batch_prompts=2",
                "--group_size=2", "--max_new_tokens=8", "--eval_batch_size=4", "--lr=1e-5", "--threads=1"])
    return out


@pytest.fixture(scope="module")
def auto_processor():
    """transformers' AutoProcessor.from_pretrained. Without torchvision (not installable beside this machine's torch
    build) transformers cannot build the Qwen-VL video processor, which image prompts never use: then that one
    part is left out, and everything else (processor class, tokenizer, chat template, image settings) is read from
    the directory as it is."""
    from transformers import AutoProcessor
    if importlib.util.find_spec("torchvision") is not None:
        yield AutoProcessor.from_pretrained
        return
    from transformers.models.auto.video_processing_auto import AutoVideoProcessor
    from transformers.processing_utils import ProcessorMixin
    check = ProcessorMixin.check_argument_for_proper_class
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AutoVideoProcessor, "from_pretrained", classmethod(lambda cls, *args, **kwargs: None))
        mp.setattr(ProcessorMixin, "check_argument_for_proper_class",
                   lambda self, name, arg: None if name == "video_processor" and arg is None else check(self, name, arg))
        yield AutoProcessor.from_pretrained


def assert_transformers_decodes_like_us(path, auto_processor, records, max_new_tokens) -> list[list[int]]:
    """Load `path` with transformers (AutoProcessor, AutoModelForImageTextToText) and with ours; the prompts must
    encode to the same ids and pixels, and greedy decoding must give the same tokens. Returns our responses."""
    from transformers import AutoModelForImageTextToText
    for name in COMPLETE:
        assert os.path.isfile(os.path.join(path, name)), f"{path} lacks {name}"
    hf_processor = auto_processor(path)
    hf = AutoModelForImageTextToText.from_pretrained(path).eval()
    assert type(hf).__name__ == json.load(open(os.path.join(path, "config.json")))["architectures"][0]
    processor, net = model.load_processor(path), model.load(path)
    responses = []
    for rec in records:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": rec.prompt}]}]
        text = hf_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = hf_processor(text=[text], images=rec.images, return_tensors="pt")
        encoded = processor.encode(rec.prompt, rec.images)
        assert torch.equal(inputs["input_ids"][0], encoded["input_ids"])
        assert torch.equal(inputs["pixel_values"], encoded["pixel_values"])
        with torch.no_grad():   # generate stops at generation_config.json's eos ids
            theirs = hf.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)[0, len(encoded["input_ids"]):]
        ro = sample.generate(net, [encoded], group_size=1, max_new_tokens=max_new_tokens, temperature=0.0,
                             stop_token_ids=processor.stop_token_ids)
        ours = ro.response_ids[0][ro.response_mask[0].bool()].tolist()
        assert theirs.tolist() == ours
        responses.append(ours)
    return responses


def run(*args):
    """A command of the README, run as a user would from the repository root."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)


def same_metrics(got: dict, want: dict) -> None:
    """eval's rule-reward metrics against train.py's held-out ones (NaN there is None in report.json; the run's
    summary also lists subsets with no record, as n 0)."""
    for key, value in got.items():
        assert (value is None and math.isnan(want[key])) or value == pytest.approx(want[key], abs=1e-12), key
    assert all(want[k] == 0 for k in want if k.startswith("n_") and k not in got)


# ----------------------------------------------------------------------------- the toy run's final/ and policy/

def test_final_and_policy_are_the_same_complete_model(toy_run, auto_processor):
    out, _ = toy_run
    final = os.path.join(out, "final")
    policy = os.path.join(checkpoints.latest_checkpoint(out), "policy")
    assert os.path.basename(os.path.dirname(policy)) == "step_000002"
    records = toy.records("test", 3, seed=0)
    responses = assert_transformers_decodes_like_us(final, auto_processor, records, max_new_tokens=80)
    stop = model.load_processor(final).stop_token_ids
    assert any(r[-1] in stop and len(r) < 80 for r in responses)   # eos compared, not only the length limit
    assert assert_transformers_decodes_like_us(policy, auto_processor, records[:1], max_new_tokens=80) == responses[:1]
    generation = json.load(open(os.path.join(final, "generation_config.json")))
    assert generation["eos_token_id"] == stop


def test_sample_cli_on_final_and_policy(toy_run, tmp_path, capsys):
    out, _ = toy_run
    rec = toy.records("test", 1, seed=0)[0]
    image = str(tmp_path / "toy.png")
    rec.images[0].save(image)
    labels = ",".join(f"{k}={v}" for k, v in rec.labels.items())
    r = run("sample.py", "--model", os.path.join(out, "final"), "--image", image, "--prompt", rec.prompt,
            "--no_step_guided", "--group_size", "2", "--max_new_tokens", "80", "--labels", labels)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("=== sample ") == 2 and r.stdout.count("--- reward ") == 2
    policy = os.path.join(checkpoints.latest_checkpoint(out), "policy")
    assert sample.main(["--model", policy, "--image", image, "--prompt", rec.prompt, "--no_step_guided",
                        "--group_size", "1", "--temperature", "0", "--max_new_tokens", "80"]) == 0
    assert "=== sample 0" in capsys.readouterr().out


def test_eval_toy_benchmark_reproduces_the_runs_heldout_metrics(toy_run, tmp_path):
    """`python -m eval --benchmark toy` on final/ is train.py's held-out evaluation after training: the same
    records, prompts and greedy decoding (same batches here), hence the same metrics as summary.json's "after"."""
    out, summary = toy_run
    report_dir = str(tmp_path / "eval_toy")
    r = run("-m", "eval", "--model", os.path.join(out, "final"), "--benchmark", "toy", "--toy_size", "8",
            "--batch_size", "8", "--out", report_dir, "--no_progress")
    assert r.returncode == 0, r.stderr
    assert "rule reward: reward=" in r.stdout and "keyword-safegrpo: tag_accuracy [combined]" in r.stdout
    report = json.load(open(os.path.join(report_dir, "report.json")))
    assert report["n_outputs"] == 8 and report["generation"]["max_new_tokens"] == 80
    assert report["generation"]["step_guided"] is False
    same_metrics(report["reward_metrics"], summary["after"])
    assert 0 < summary["after"]["format_rate"]     # a warm-started model: the metrics are not all zero
    rows = [json.loads(line) for line in open(os.path.join(report_dir, "outputs.jsonl"))]
    assert [row["labels"] for row in rows] == [rec.labels for rec in toy.records("test", 8, seed=0)]
    assert "## Rule reward" in open(os.path.join(report_dir, "report.md")).read()


def test_eval_toy_benchmark_on_a_checkpoint_policy(toy_run, tmp_path, capsys):
    from eval.__main__ import main as eval_main
    out, _ = toy_run
    policy = os.path.join(checkpoints.latest_checkpoint(out), "policy")
    assert eval_main(["--model", policy, "--benchmark", "toy", "--toy_size", "8", "--limit", "2", "--out",
                      str(tmp_path / "eval"), "--no_progress"]) == 0
    assert "rule reward: reward=" in capsys.readouterr().out


# ----------------------------------------------------------------------------- from a transformers-written checkpoint

def test_run_from_a_transformers_checkpoint_ends_in_a_complete_model(qwen25_run, auto_processor, tmp_path, capsys):
    from eval.__main__ import main as eval_main
    final = os.path.join(qwen25_run, "final")
    assert assert_transformers_decodes_like_us(final, auto_processor, toy.records("test", 2, seed=0), 16)
    generation = json.load(open(os.path.join(final, "generation_config.json")))
    assert generation["eos_token_id"] == model.load_processor(final).stop_token_ids   # not the source's 151645
    assert "_from_model_config" not in generation
    policy = os.path.join(checkpoints.latest_checkpoint(qwen25_run), "policy")
    assert sorted(os.listdir(policy)) == sorted(os.listdir(final))
    image = str(tmp_path / "toy.png")
    toy.records("test", 1, seed=0)[0].images[0].save(image)
    assert sample.main(["--model", final, "--image", image, "--prompt", "What is this?", "--group_size", "2",
                        "--max_new_tokens", "6"]) == 0
    assert eval_main(["--model", final, "--benchmark", "toy", "--toy_size", "2", "--max_new_tokens", "8",
                      "--out", str(tmp_path / "eval"), "--no_progress"]) == 0
    assert capsys.readouterr().out.count("=== sample ") == 2
