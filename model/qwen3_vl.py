"""Qwen3-VL (dense text decoder) in plain PyTorch: its vision tower (vision.py, with DeepStack) in the shared
Qwen-VL model (qwen_vl.py: image tokens -> decoder with interleaved M-RoPE and DeepStack injection -> lm_head).

Matches transformers' Qwen3VLForConditionalGeneration (5.23) logits on the same weights. Load a checkpoint
with `model.load(dir)`; see tests/test_model_qwen3vl.py for the parity tests.
"""
from .config import Qwen3VLConfig
from .qwen_vl import QwenVL
from .vision import VisionModel


class Qwen3VL(QwenVL):
    config_class = Qwen3VLConfig
    vision_class = VisionModel
    # The current (v5) names first (what `save` writes, as transformers does), then the Qwen2-VL-era layout
    # (`visual.*` and `model.layers.*` at the top level).
    hf_key_prefixes = (
        ("model.visual.", "visual."),
        ("model.language_model.", "language_model."),
        ("lm_head.", "lm_head."),
        ("visual.", "visual."),
        ("model.", "language_model."),
    )
