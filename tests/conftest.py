"""Shared pytest setup: the repository root importable, CPU threads kept small, and `tiny_vlm`, the one tiny
random vision-language model kit of the sampler, engine and training-forward tests (both architectures, a BPE
tokenizer built in code, prompts with zero, one and two images)."""
import os
import sys
from types import SimpleNamespace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(min(2, os.cpu_count() or 1))

ARCHS = ("qwen3_vl", "qwen2_5_vl")
CORPUS = ["What is in this image? Is it safe to use? Describe the picture.",
          "<think>\nA knife on a table. <visual_safe>safe</visual_safe>\n</think>\n"
          "<answer>A kitchen knife.</answer>"] * 20
PATCH = 8  # Qwen3-VL: small patches, a 32 x 48 image is a (1, 4, 6) grid = 6 image tokens
STOP = tuple(range(40))  # ~10% of the vocabulary: random-weight rows then stop at different steps


def build_tiny(arch: str = "qwen3_vl"):
    """(model, processor): a tiny random Qwen-VL (eval mode, fp32, CPU) whose special token ids follow a tokenizer
    built in code; weights scrambled far from a fresh init, so a swapped bias or norm would show."""
    import model
    from model.processor import Processor
    from tiny import scramble_, tiny_qwen2_5vl_config, tiny_qwen3vl_config
    from model.tokenizer import build_tokenizer, vision_token_ids
    tok = build_tokenizer(CORPUS, vocab_size=400)
    make, patch, cls = {"qwen3_vl": (tiny_qwen3vl_config, PATCH, model.Qwen3VL),
                        "qwen2_5_vl": (tiny_qwen2_5vl_config, 14, model.Qwen2_5_VL)}[arch]
    cfg = make(vocab_size=len(tok), patch_size=patch, **vision_token_ids(tok))
    torch.manual_seed(0)
    net = scramble_(cls(cfg), seed=1).eval()
    proc = Processor(tok, patch_size=patch, min_pixels=(2 * patch) ** 2, max_pixels=(8 * patch) ** 2)
    return net, proc


def image(h: int, w: int, seed: int):
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


def make_prompts(proc) -> list[dict]:
    """Image and text prompts of different lengths (one with two images)."""
    return [proc.encode("What is in this image?", [image(32, 48, 0)]),
            proc.encode("Is it safe?"),
            proc.encode("Describe <image> and <image> in detail, please.", [image(48, 32, 1), image(32, 32, 2)]),
            proc.encode("What is in this image? Is it safe to use? Describe the picture.", [image(64, 48, 3)])]


@pytest.fixture(scope="session")
def tiny_vlm():
    """build(arch) -> (model, processor) (a fresh model each call), prompts(processor), image(h, w, seed), STOP."""
    return SimpleNamespace(build=build_tiny, prompts=make_prompts, image=image, STOP=STOP, ARCHS=ARCHS)


@pytest.fixture
def serve():
    """serve(script, on_request=None) -> a started chat_server.JudgeServer on 127.0.0.1, closed after the test."""
    from chat_server import JudgeServer
    servers = []

    def start(script, on_request=None):
        servers.append(JudgeServer(script, on_request))
        return servers[-1]
    yield start
    for s in servers:
        s.close()
