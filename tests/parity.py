"""Helpers the parity tests share: the tiny inputs both architectures are run on, the closeness check, and the
transformers processor our processor is compared with (test_model_qwen3vl.py, test_model_qwen2_5vl.py,
test_checkpoint.py, test_processor.py)."""
import json
import os

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, PreTrainedModel
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

TOL = 1e-4  # max abs logit difference against transformers in fp32
PATCH = 8   # small patches keep pixel_values small; the code path is the same as with 16
IMG, V_START, V_END, PAD = 505, 503, 504, 0  # the tiny configs' image, vision start/end and pad ids
GRID = [(1, 4, 6)]  # logits_of's image: 2 x 3 merged tokens (for Qwen2.5-VL two windows, one cut short)


def make_pixels(grids, gen):
    return torch.randn(sum(t * h * w for t, h, w in grids), 3 * 2 * PATCH * PATCH, generator=gen)


def left_pad(rows):
    """list of id lists -> (ids (B, T), mask (B, T)) left-padded."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), PAD)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = torch.tensor(r)
        mask[b, T - len(r):] = 1
    return ids, mask


def inputs():
    gen = torch.Generator().manual_seed(0)
    ids = [1, 2, 3, 503] + [IMG] * 6 + [504] + torch.randint(0, 500, (8,), generator=gen).tolist()
    ids = torch.tensor([ids])
    pixels = torch.randn(24, 3 * 2 * PATCH * PATCH, generator=gen)
    return ids, pixels, torch.tensor(GRID)


@torch.no_grad()
def logits_of(m):
    """Logits of ours or of a transformers model (either architecture) on one image prompt."""
    ids, pixels, grid = inputs()
    if isinstance(m, PreTrainedModel):
        return m(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=(ids == IMG).int()).logits
    return m(ids, pixel_values=pixels, image_grid_thw=grid)


def assert_close(a, b):
    err = (a - b).abs().max().item()
    assert err <= TOL, f"max abs diff {err:.3e}"


# ---- the processor against transformers' Qwen3VLProcessor

CORPUS = ["What is in this image? Is it safe? Describe the picture and the text in it.",
          "<think>\nA knife on a table.\n</think>\n<answer>It is a kitchen knife.</answer>"] * 10


def without_video_processor(processor_class):
    """transformers' processor class, usable without a video processor: that one needs torchvision, which is not
    installed. Only the class check of the (unused) video processor is skipped; the text and image paths are HF's."""

    class NoVideoProcessor(processor_class):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return NoVideoProcessor


def make_dir(root, tokenizer, config):
    os.makedirs(root, exist_ok=True)
    tokenizer.save_pretrained(root, save_jinja_files=False)
    with open(os.path.join(root, "preprocessor_config.json"), "w") as f:
        json.dump(config, f)
    return str(root)


def hf_processor(path, processor_class=Qwen3VLProcessor):
    image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    assert type(image_processor).__name__ == "Qwen2VLImageProcessorPil"  # what transformers picks without torchvision
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    hf_class = without_video_processor(processor_class)
    return hf_class(image_processor=image_processor, tokenizer=tok, video_processor=None)


def hf_encode(proc, content, images):
    """The standard Qwen3-VL recipe: render with the tokenizer's template, then processor(text, images)."""
    text = proc.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                              add_generation_prompt=True)
    return proc(text=[text], images=images or None, return_tensors="pt")


def random_image(h, w, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def assert_same(ours, theirs, n_images):
    assert ours["input_ids"].dtype == torch.long and ours["input_ids"].dim() == 1
    assert torch.equal(ours["input_ids"], theirs["input_ids"][0])
    if n_images == 0:
        assert ours["pixel_values"] is None and ours["image_grid_thw"] is None
        return
    assert ours["pixel_values"].dtype == torch.float32 == theirs["pixel_values"].dtype
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])       # bit for bit
    assert torch.equal(ours["image_grid_thw"], theirs["image_grid_thw"])
