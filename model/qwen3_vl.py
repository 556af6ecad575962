"""Qwen3-VL (dense text decoder) in plain PyTorch: its vision tower (vision.py, with DeepStack) in the shared
Qwen-VL model (qwen_vl.py: image tokens -> decoder with interleaved M-RoPE and DeepStack injection -> lm_head).

Matches transformers' Qwen3VLForConditionalGeneration (5.23) logits on the same weights. Load a checkpoint
with `model.load(dir)`; see tests/test_model_qwen3vl.py for the parity tests.
"""
from .config import Qwen3VLConfig
from .qwen_vl import LEGACY_KEYS, V5_KEYS, QwenVL
from .vision import VisionModel


class Qwen3VL(QwenVL):
    config_class = Qwen3VLConfig
    vision_class = VisionModel
    hf_key_prefixes = V5_KEYS + LEGACY_KEYS  # transformers 5.23 writes the v5 names for Qwen3-VL; so does `save`
