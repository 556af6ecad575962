"""What is Qwen2.5-VL's own, against transformers' Qwen2_5_VLForConditionalGeneration on a tiny random config (fp32,
CPU): the window order, contiguous M-RoPE, config.json and checkpoint key names, the processor and position ids.
The parity set both architectures share runs in test_model_qwen3vl.py (its `models` fixture takes each), the
checkpoint round trips in test_checkpoint.py (`arch_hf`).
Run: .venv/bin/python -m pytest -q tests/test_model_qwen2_5vl.py
"""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5_VLConfig as HFConfig
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.vision_utils import get_vision_window_index

import model
from model.processor import load_processor
from model.rope import mrope_axes, mrope_cos_sin, rope_index
from parity import (CORPUS, PATCH, TOL, assert_close, assert_same, hf_encode, hf_processor, left_pad, logits_of,
                    make_dir, make_pixels, random_image)
from tiny import tiny_hf
from model.tokenizer import build_tokenizer
from model.vision_qwen2_5 import window_order

GRID = [(1, 6, 10)]  # 3 x 5 merged tokens: 2 x 3 windows of 2 x 2, the last row and column cut short
# (parity.logits_of runs a (1, 4, 6) image: 2 x 3 merged tokens, two windows, one cut short)


@pytest.fixture(scope="module")
def hf():
    return tiny_hf("qwen2_5_vl", patch_size=PATCH)


@pytest.fixture(scope="module")
def hf_dir(hf, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_single")
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(hf, hf_dir):
    """(hf, ours) with the same scrambled weights; ours loaded through our own checkpoint reader."""
    ours = model.load(hf_dir)
    assert type(ours) is model.Qwen2_5_VL  # picked from config.json's model_type
    return hf, ours


# ---- window attention ----

def test_window_order_by_hand_and_against_hf():
    order, lengths = window_order(torch.tensor(GRID), merge=2, window=2)
    # Merged grid 3 x 5 (token k at row k // 5, col k % 5); tiles of 2 x 2, row-major, cut at the edges.
    assert order.tolist() == [0, 1, 5, 6, 2, 3, 7, 8, 4, 9, 10, 11, 12, 13, 14]
    assert lengths == [16, 16, 8, 8, 8, 4]  # patches: 4 tokens x 4, ..., 1 token x 4
    cases = [[(1, 6, 10)], [(1, 4, 6), (1, 12, 4)], [(2, 4, 8), (1, 2, 2)], [(1, 16, 16)], [(1, 14, 6)]]
    for grids in cases:
        for window in (1, 2, 3, 8):
            grid = torch.tensor(grids)
            order, lengths = window_order(grid, merge=2, window=window)
            want_order, want_cu = get_vision_window_index(grid, spatial_merge_size=2, window_size=window * 2 * PATCH,
                                                          patch_size=PATCH)
            assert torch.equal(order, want_order)
            assert torch.tensor([0] + lengths).cumsum(0).tolist() == want_cu.tolist()


@torch.no_grad()
def test_window_attention_matters(models):
    """A window as large as the image is full attention; the tiny config's windows give other tokens."""
    hf, ours = models
    gen = torch.Generator().manual_seed(12)
    grids = torch.tensor([(1, 6, 10), (1, 4, 4)])
    pixels = make_pixels(grids.tolist(), gen)

    def tokens_with(**vision):
        config = dataclasses.replace(ours.config, vision=dataclasses.replace(ours.config.vision, **vision))
        other = type(ours)(config)
        other.load_state_dict(ours.state_dict())
        return other.encode_images(pixels, grids)[0]

    windowed = ours.encode_images(pixels, grids)[0]
    full = tokens_with(fullatt_block_indexes=(0, 1, 2))
    assert (tokens_with(window_size=1000) - full).abs().max() <= 1e-5
    assert (windowed - full).abs().max() > 1e-2
    assert (windowed - torch.cat(hf.model.get_image_features(pixels, grids).pooler_output)).abs().max() <= TOL


# ---- M-RoPE ----

def test_mrope_layouts():
    # Qwen2.5-VL: contiguous blocks of (t, h, w) pairs; Qwen3-VL: interleaved t h w t h w ..., then t.
    assert mrope_axes((2, 3, 3), interleaved=False).tolist() == [0, 0, 1, 1, 1, 2, 2, 2]
    assert mrope_axes((3, 3, 2), interleaved=True).tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    assert mrope_axes((16, 24, 24), interleaved=False).bincount().tolist() == [16, 24, 24]


@torch.no_grad()
def test_mrope_cos_sin_match_hf(models):
    hf, ours = models
    t = ours.config.text
    position_ids = torch.randint(0, 50, (3, 2, 7), generator=torch.Generator().manual_seed(13))
    x = torch.zeros(1, dtype=torch.float32)
    want_cos, want_sin = hf.model.language_model.rotary_emb(x, position_ids)
    cos, signed_sin = mrope_cos_sin(position_ids, t.head_dim, t.rope_theta, t.mrope_section, torch.float32,
                                    interleaved=False)
    half = t.head_dim // 2  # ours carries rotate_half's sign in the sine: (-sin, sin) over the two halves
    assert torch.equal(cos, want_cos)
    assert torch.equal(signed_sin, torch.cat((-want_sin[..., :half], want_sin[..., half:]), dim=-1))


# ---- config.json and checkpoints ----

# The config.json of the released Qwen2.5-VL-7B-Instruct (flat, legacy names, vision keys HF ignores).
RELEASED_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 128000,
    "max_window_layers": 28, "model_type": "qwen2_5_vl", "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
        "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
        "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
        "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 152064,
}


def hf_config(d: dict) -> HFConfig:
    return HFConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})


def test_released_config_parses_like_transformers():
    for d in (RELEASED_7B, {**RELEASED_7B, "tie_word_embeddings": True}):
        ours, theirs = model.Qwen2_5_VLConfig.from_hf_dict(d), hf_config(d)
        for again in (theirs, hf_config(ours.to_hf_dict())):  # what we write back reads the same
            t, ht, v, hv = ours.text, again.text_config, ours.vision, again.vision_config
            assert (t.rope_theta, list(t.mrope_section)) == (ht.rope_parameters["rope_theta"],
                                                             ht.rope_parameters["mrope_section"])
            assert t.head_dim == ht.hidden_size // ht.num_attention_heads == 128
            for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "max_position_embeddings"):
                assert getattr(t, name) == getattr(ht, name), name
            for name in ("depth", "hidden_size", "intermediate_size", "num_heads", "patch_size", "window_size",
                         "spatial_merge_size", "temporal_patch_size", "out_hidden_size", "tokens_per_second"):
                assert getattr(v, name) == getattr(hv, name), name
            assert list(v.fullatt_block_indexes) == list(hv.fullatt_block_indexes)
            assert v.rope_theta == hv.rope_parameters["rope_theta"]
            assert ours.tie_word_embeddings == again.tie_word_embeddings == d["tie_word_embeddings"]
        assert (t.qk_norm, t.qkv_bias, t.o_bias, t.mrope_interleaved) == (False, True, False, False)
    with pytest.raises(NotImplementedError, match="use_sliding_window"):
        model.Qwen2_5_VLConfig.from_hf_dict({**RELEASED_7B, "use_sliding_window": True})
    with pytest.raises(ValueError, match="window_size 20 is smaller than one merged token"):
        model.Qwen2_5_VLConfig.from_hf_dict({**RELEASED_7B, "vision_config": {
            **RELEASED_7B["vision_config"], "window_size": 20}})


def test_transformers_save_uses_legacy_key_names(hf_dir):
    """What transformers 5.23 writes for Qwen2.5-VL (checked, not assumed): the released checkpoints' key names
    (visual.*, model.layers.*), with a nested config.json. It loads into ours (the models fixture does that)."""
    keys = set(load_file(hf_dir / "model.safetensors"))
    assert {"visual.blocks.0.attn.qkv.weight", "visual.merger.mlp.0.weight", "model.layers.0.self_attn.q_proj.bias",
            "model.embed_tokens.weight", "lm_head.weight"} <= keys
    assert not any(k.startswith(("model.visual.", "model.language_model.")) for k in keys)
    assert "text_config" in json.loads((hf_dir / "config.json").read_text())


def test_save_writes_released_layout(models, hf_dir, tmp_path):
    """Our save: the key names transformers writes, and the flat config.json of the releases."""
    _, ours = models
    model.save(ours, tmp_path / "ckpt")
    assert set(load_file(tmp_path / "ckpt" / "model.safetensors")) == set(load_file(hf_dir / "model.safetensors"))
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert "text_config" not in config and config["rope_scaling"] == {"type": "mrope", "mrope_section": [2, 3, 3]}
    assert config["model_type"] == "qwen2_5_vl" and config["torch_dtype"] == "float32"


def test_v5_key_names_load(hf, hf_dir, tmp_path):
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    renamed = {}
    for key, t in load_file(hf_dir / "model.safetensors").items():
        if key.startswith("visual."):
            key = "model." + key
        elif key.startswith("model."):
            key = key.replace("model.", "model.language_model.", 1)
        renamed[key] = t
    save_file(renamed, tmp_path / "model.safetensors")
    assert_close(logits_of(model.load(tmp_path)), logits_of(hf))


def test_unsupported_model_type_lists_both(hf_dir, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**json.loads((hf_dir / "config.json").read_text()),
                                                      "model_type": "qwen2_vl"}))
    with pytest.raises(ValueError, match=r"unknown model_type 'qwen2_vl'; supported: \['qwen2_5_vl', 'qwen3_vl'\]"):
        model.load(tmp_path)


# ---- preprocessing and position ids ----

# preprocessor_config.json of the released Qwen2.5-VL checkpoints.
QWEN2_5_VL_PREPROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
}


def test_processor_and_position_ids_match_hf(models, tmp_path):
    hf_net, _ = models
    path = make_dir(tmp_path / "ckpt", build_tokenizer(CORPUS, vocab_size=320), QWEN2_5_VL_PREPROCESSOR)
    ours, hf = load_processor(path), hf_processor(path, Qwen2_5_VLProcessor)
    assert (ours.patch_size, ours.min_pixels, ours.max_pixels) == (14, 3136, 12845056)
    a, b = random_image(37, 91, 0), random_image(300, 500, 1)
    image, text = {"type": "image"}, lambda s: {"type": "text", "text": s}
    cases = [("What is this?", [], [text("What is this?")]),
             ("<image>What is this?", [a], [image, text("What is this?")]),
             ("Compare <image> with <image>.", [a, b], [text("Compare "), image, text(" with "), image, text(".")])]
    rows, grids = [], []
    for prompt, images, content in cases:
        got, want = ours.encode(prompt, images), hf_encode(hf, content, images)
        assert_same(got, want, len(images))
        grid = got["image_grid_thw"]
        pos, delta = rope_index(got["input_ids"][None], grid, None, ours.image_token_id, ours.merge_size)
        want_pos, want_delta = hf_net.model.get_rope_index(want["input_ids"], want["mm_token_type_ids"],
                                                              image_grid_thw=grid)
        assert torch.equal(pos, want_pos) and torch.equal(delta.view(-1), want_delta.view(-1))
        rows.append(got["input_ids"].tolist())
        grids += [] if grid is None else grid.tolist()
    # The three prompts left-padded into one batch.
    ids, mask = left_pad(rows)
    pos, delta = rope_index(ids, torch.tensor(grids), mask, ours.image_token_id, ours.merge_size)
    want_pos, want_delta = hf_net.model.get_rope_index(ids, (ids == ours.image_token_id).int(),
                                                          image_grid_thw=torch.tensor(grids), attention_mask=mask)
    assert torch.equal(pos, want_pos) and torch.equal(delta.view(-1), want_delta.view(-1))
