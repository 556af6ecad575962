"""Qwen2.5-VL in plain PyTorch: its vision tower (vision_qwen2_5.py: window attention, RMSNorm + SwiGLU blocks)
in the shared Qwen-VL model (qwen_vl.py), whose decoder runs as Qwen2 (q/k/v biases, no q/k norm) with
contiguous M-RoPE sections; both set by Qwen2_5_VLConfig.

Matches transformers' Qwen2_5_VLForConditionalGeneration (5.23) logits on the same weights. Load a checkpoint
with `model.load(dir)`; see tests/test_model_qwen2_5vl.py for the parity tests.
"""
from .config import Qwen2_5_VLConfig
from .qwen_vl import LEGACY_KEYS, V5_KEYS, QwenVL
from .vision_qwen2_5 import Qwen2_5_VisionModel


class Qwen2_5_VL(QwenVL):
    config_class = Qwen2_5_VLConfig
    vision_class = Qwen2_5_VisionModel
    # The released checkpoints and transformers 5.23's save_pretrained use the legacy names; so does `save`.
    hf_key_prefixes = LEGACY_KEYS + V5_KEYS
