"""model/processor.py against transformers' Qwen3VLProcessor (PIL image backend) on the same images and messages:
pixel_values, image_grid_thw and input_ids must be equal bit for bit. Plus marker placement and bad input."""
import io
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from model.processor import load_image, load_processor, smart_resize
from model.tokenizer import build_tokenizer
from parity import CORPUS, assert_same, hf_encode, hf_processor, make_dir, random_image

PROMPT = "What is in this image?"

# The Qwen3-VL release settings, in the transformers-5 `size` form.
QWEN3_VL_CONFIG = {"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16,
                   "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
                   "image_std": [0.5, 0.5, 0.5], "processor_class": "Qwen3VLProcessor",
                   "image_processor_type": "Qwen2VLImageProcessorFast"}
# A small pixel budget in the legacy min_pixels/max_pixels form, so a moderate image already hits max_pixels.
SMALL_BUDGET_CONFIG = {"min_pixels": 32 * 32 * 8, "max_pixels": 32 * 32 * 60, "patch_size": 16,
                       "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
                       "image_std": [0.5, 0.5, 0.5], "image_processor_type": "Qwen2VLImageProcessor"}
# Keys left out: transformers fills in Qwen2-VL's class defaults (patch 14, CLIP mean/std, 3136..1003520 pixels).
SPARSE_CONFIG = {"image_processor_type": "Qwen2VLImageProcessor"}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(CORPUS, vocab_size=320)


@pytest.fixture(scope="module")
def qwen3_dirs(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3vl")
    path = make_dir(root / "ckpt", tokenizer, QWEN3_VL_CONFIG)
    return load_processor(path), hf_processor(path)


IMG_37x91 = dict(h=37, w=91)
IMG_500x300 = dict(h=300, w=500)


@pytest.mark.parametrize("case", ["text_only", "37x91", "500x300", "two_images", "three_mixed_placement"])
def test_matches_hf_qwen3vl(qwen3_dirs, case):
    ours, hf = qwen3_dirs
    a, b, c = random_image(37, 91, 0), random_image(300, 500, 1), random_image(64, 200, 2)
    image, text = {"type": "image"}, lambda s: {"type": "text", "text": s}
    if case == "text_only":
        images, prompt, content = [], PROMPT, [text(PROMPT)]
    elif case == "37x91":          # far below min_pixels=65536: upscaled
        images, prompt, content = [a], PROMPT, [image, text(PROMPT)]
    elif case == "500x300":
        images, prompt, content = [b], PROMPT, [image, text(PROMPT)]
    elif case == "two_images":
        images, prompt, content = [a, b], "Compare <image> with <image>.", [
            text("Compare "), image, text(" with "), image, text(".")]
    else:                          # 3 images, 1 marker: the first two (unmarked) go before the text, in order
        images, prompt, content = [a, b, c], "Left: <image> right.", [image, image, text("Left: "), image,
                                                                       text(" right.")]
    got = ours.encode(prompt, images)
    assert_same(got, hf_encode(hf, content, images), len(images))
    if case == "37x91":
        assert got["image_grid_thw"].tolist() == [[1, 12, 26]]                 # 192x416 >= 65536 pixels
        assert int((got["input_ids"] == ours.image_token_id).sum()) == 12 * 26 // 4


def test_max_pixels_downscale_and_min_pixels_upscale_legacy_config(tokenizer, tmp_path):
    path = make_dir(tmp_path / "small", tokenizer, SMALL_BUDGET_CONFIG)
    ours, hf = load_processor(path), hf_processor(path)
    assert (ours.min_pixels, ours.max_pixels) == (8192, 61440)
    big, tiny = random_image(1200, 1600, 3), random_image(20, 30, 4)
    got = ours.encode("<image> and <image>", [big, tiny])
    assert_same(got, hf_encode(hf, [{"type": "image"}, {"type": "text", "text": " and "}, {"type": "image"}],
                               [big, tiny]), 2)
    (t1, h1, w1), (t2, h2, w2) = got["image_grid_thw"].tolist()
    assert 1200 * 1600 > 61440 and h1 * w1 * 16 * 16 <= 61440          # big was shrunk to the budget
    assert h2 * w2 * 16 * 16 >= 8192 and h2 * w2 * 16 * 16 > 32 * 32   # tiny was enlarged past min_pixels


def test_hf_fallback_defaults_for_missing_keys(tokenizer, tmp_path):
    path = make_dir(tmp_path / "sparse", tokenizer, SPARSE_CONFIG)
    ours, hf = load_processor(path), hf_processor(path)
    assert ours.patch_size == 14 and ours.image_std[0] == pytest.approx(0.26862954)
    images = [random_image(37, 91, 5), random_image(300, 500, 6)]
    assert_same(ours.encode("<image><image>" + PROMPT, images),
                hf_encode(hf, [{"type": "image"}, {"type": "image"}, {"type": "text", "text": PROMPT}], images), 2)


def test_image_modes_and_paths_match_hf(qwen3_dirs, tmp_path):
    """RGBA / palette-with-transparency (composited onto white), grayscale, and file paths (EXIF applied)."""
    ours, hf = qwen3_dirs
    rgba = random_image(60, 45, 7, "RGBA")
    rgba.putalpha(Image.fromarray(np.random.default_rng(8).integers(0, 256, (60, 45), dtype=np.uint8)))
    palette = random_image(50, 70, 9, "P")
    palette.info["transparency"] = 3
    gray = random_image(81, 33, 10, "L")
    rotated = random_image(40, 90, 11)
    exif = Image.Exif()
    exif[0x0112] = 6                                                    # orientation: rotate 90 degrees
    jpg = tmp_path / "rotated.jpg"
    rotated.save(jpg, exif=exif)
    png = tmp_path / "rgba.png"
    rgba.save(png)
    images_ours = [rgba, palette, gray, str(jpg), png, png.read_bytes()]
    images_hf = [rgba, palette, gray, str(jpg), str(png), str(png)]
    got = ours.encode("<image>" * 6, images_ours)
    assert_same(got, hf_encode(hf, [{"type": "image"}] * 6, images_hf), 6)
    assert got["image_grid_thw"][3].tolist()[1] > got["image_grid_thw"][3].tolist()[2]  # EXIF made it portrait


def test_smart_resize_matches_hf():
    for h in list(range(1, 80, 3)) + [223, 224, 225, 999, 1000, 4095]:
        for w in (1, 7, 28, 29, 56, 300, 1001, 2048):
            if max(h, w) / min(h, w) > 200:
                with pytest.raises(ValueError, match="aspect ratio"):
                    smart_resize(h, w, 32, 65536, 16777216)
                continue
            for factor, lo, hi in ((32, 65536, 16777216), (28, 3136, 1003520), (32, 8192, 61440)):
                assert smart_resize(h, w, factor, lo, hi) == hf_smart_resize(h, w, factor, lo, hi)


def test_save_then_load_round_trip(qwen3_dirs, tmp_path):
    ours, _ = qwen3_dirs
    out = tmp_path / "saved"
    ours.save(str(out))
    cfg = json.loads((out / "preprocessor_config.json").read_text())
    assert cfg["size"] == {"shortest_edge": 65536, "longest_edge": 16777216}
    assert (cfg["min_pixels"], cfg["max_pixels"], cfg["patch_size"]) == (65536, 16777216, 16)
    assert cfg["processor_class"] == "Qwen3VLProcessor"
    again, hf = load_processor(str(out)), hf_processor(str(out))   # transformers reads our saved dir as well
    images = [random_image(37, 91, 12), random_image(300, 500, 13)]
    a, b = ours.encode("<image>x<image>", images), again.encode("<image>x<image>", images)
    for k in a:
        assert torch.equal(a[k], b[k])
    assert_same(b, hf_encode(hf, [{"type": "image"}, {"type": "text", "text": "x"}, {"type": "image"}], images), 2)


def test_tokens_decode_and_generation_prompt(qwen3_dirs, tokenizer):
    ours, _ = qwen3_dirs
    vocab = tokenizer.get_vocab()
    assert ours.stop_token_ids == [vocab["<|im_end|>"], vocab["<|endoftext|>"]]
    assert ours.pad_token_id == vocab["<|endoftext|>"]
    assert ours.image_token_id == vocab["<|image_pad|>"]
    assert ours.vision_start_token_id == vocab["<|vision_start|>"]
    ids = ours.encode("A <image> B", [random_image(32, 32, 14)])["input_ids"]
    n = ours.num_image_tokens(ours.encode("", [random_image(32, 32, 14)])["image_grid_thw"][0])
    assert ours.decode(ids) == ("<|im_start|>user\nA <|vision_start|>" + "<|image_pad|>" * n
                                + "<|vision_end|> B<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert ours.decode(ours.encode("hi", add_generation_prompt=False)["input_ids"]) == (
        "<|im_start|>user\nhi<|im_end|>\n")
    assert ours.decode(ids, skip_special_tokens=True) == "user\nA  B\nassistant\n<think>\n"


def test_marker_and_placeholder_errors(qwen3_dirs):
    ours, _ = qwen3_dirs
    with pytest.raises(ValueError, match="2 <image> markers but only 1 images"):
        ours.encode("<image> and <image>", [random_image(32, 32, 15)])
    with pytest.raises(ValueError, match=re.escape("0 images; does the text contain '<|image_pad|>'")):
        ours.encode("smuggled <|image_pad|>", [])


def test_bad_images_name_the_file(qwen3_dirs, tmp_path):
    ours, _ = qwen3_dirs
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        ours.encode("<image>", [str(missing)])
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with pytest.raises(ValueError, match="corrupt.jpg"):
        ours.encode("<image>", [str(corrupt)])
    buf = io.BytesIO()
    random_image(64, 64, 16).save(buf, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # header fine, pixel data cut off
    with pytest.raises(ValueError, match="truncated.png"):
        ours.encode("<image>", [truncated])
    with pytest.raises(ValueError, match=r"image 1: cannot decode image data \(9 bytes\)"):
        ours.encode("<image><image>", [random_image(32, 32, 17), b"garbage!!"])
    with pytest.raises(TypeError, match="PIL image, a file path or bytes"):
        load_image(np.zeros((4, 4, 3)))


def test_bad_checkpoint_dirs_name_the_file(tokenizer, tmp_path):
    good = make_dir(tmp_path / "good", tokenizer, QWEN3_VL_CONFIG)
    with pytest.raises(FileNotFoundError, match="not_there"):
        load_processor(str(tmp_path / "not_there"))

    no_tok = tmp_path / "no_tok"
    shutil.copytree(good, no_tok)
    os.remove(no_tok / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match=f"no tokenizer in {no_tok}.*tokenizer.json"):
        load_processor(str(no_tok))

    bad_tok = tmp_path / "bad_tok"
    shutil.copytree(good, bad_tok)
    (bad_tok / "tokenizer.json").write_text("{ not json")
    with pytest.raises(ValueError, match=str(bad_tok / "tokenizer.json")):
        load_processor(str(bad_tok))

    bad_tok_cfg = tmp_path / "bad_tok_cfg"
    shutil.copytree(good, bad_tok_cfg)
    (bad_tok_cfg / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match=f"{bad_tok_cfg / 'tokenizer_config.json'} is not valid JSON"):
        load_processor(str(bad_tok_cfg))

    no_cfg = tmp_path / "no_cfg"
    shutil.copytree(good, no_cfg)
    os.remove(no_cfg / "preprocessor_config.json")
    with pytest.raises(FileNotFoundError, match=str(no_cfg / "preprocessor_config.json")):
        load_processor(str(no_cfg))

    bad_json = tmp_path / "bad_json"
    shutil.copytree(good, bad_json)
    (bad_json / "preprocessor_config.json").write_text('{"patch_size": 16,')
    with pytest.raises(ValueError, match=f"{bad_json / 'preprocessor_config.json'} is not valid JSON"):
        load_processor(str(bad_json))

    bad_model_cfg = tmp_path / "bad_model_cfg"   # AutoTokenizer reads config.json too: named, not "the tokenizer"
    shutil.copytree(good, bad_model_cfg)
    (bad_model_cfg / "config.json").write_text('{"model_type": "qwen3_vl",')
    with pytest.raises(ValueError, match=f"{bad_model_cfg / 'config.json'} is not valid JSON"):
        load_processor(str(bad_model_cfg))

    bad_value = tmp_path / "bad_value"
    shutil.copytree(good, bad_value)
    (bad_value / "preprocessor_config.json").write_text(json.dumps({**QWEN3_VL_CONFIG, "patch_size": "16"}))
    with pytest.raises(ValueError, match="preprocessor_config.json: 'patch_size' must be a positive integer"):
        load_processor(str(bad_value))


def test_chat_template_from_chat_template_json(tokenizer, tmp_path):
    """Some releases keep the template only in the processor's chat_template.json."""
    path = make_dir(tmp_path / "ct", tokenizer, QWEN3_VL_CONFIG)
    cfg_file = os.path.join(path, "tokenizer_config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    template = cfg.pop("chat_template")
    with open(cfg_file, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="no chat template"):
        load_processor(path)
    with open(os.path.join(path, "chat_template.json"), "w") as f:
        json.dump({"chat_template": template}, f)
    proc = load_processor(path)
    assert proc.decode(proc.encode("hi")["input_ids"]).endswith("<|im_start|>assistant\n<think>\n")
