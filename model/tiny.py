"""Tiny Qwen3-VL configs built in code, for tests and the toy world (no downloads).

`tiny_qwen3vl_config(...)` returns our config object; `tiny_qwen3vl_hf_dict(...)` the same model as a
dict that transformers' `Qwen3VLConfig(**d)` accepts (and that `Qwen3VLConfig.from_hf_dict` reads back).
Token ids are parameters so they can follow a tokenizer built by model/tokenizer.py.
"""
import torch

from .config import Qwen3VLConfig, TextConfig, VisionConfig


def tiny_qwen3vl_config(vocab_size: int = 512, image_token_id: int = 505, video_token_id: int = 506,
                        vision_start_token_id: int = 503, vision_end_token_id: int = 504,
                        tie_word_embeddings: bool = False, patch_size: int = 16, text_layers: int = 2,
                        hidden_size: int = 64, vision_hidden_size: int = 32, vision_depth: int = 3,
                        deepstack_visual_indexes=(0, 1), num_position_embeddings: int = 64) -> Qwen3VLConfig:
    """~0.2M parameters (plus vocab_size * 64 * 2): 2 text layers of width 64 (4 query heads, 2 kv heads,
    head_dim 16), a 3-block ViT of width 32 with DeepStack taps after blocks 0 and 1."""
    head_dim = 16
    text = TextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
        rope_theta=10000.0, mrope_section=(3, 3, 2),  # sums to head_dim // 2 = 8 frequency pairs
        max_position_embeddings=4096,
    )
    vision = VisionConfig(
        depth=vision_depth, hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size,
        num_heads=2, patch_size=patch_size, temporal_patch_size=2, spatial_merge_size=2,
        out_hidden_size=hidden_size, num_position_embeddings=num_position_embeddings,
        deepstack_visual_indexes=tuple(deepstack_visual_indexes),
    )
    return Qwen3VLConfig(text=text, vision=vision, image_token_id=image_token_id, video_token_id=video_token_id,
                         vision_start_token_id=vision_start_token_id, vision_end_token_id=vision_end_token_id,
                         tie_word_embeddings=tie_word_embeddings)


def tiny_qwen3vl_hf_dict(**kwargs) -> dict:
    """The same tiny model as a transformers Qwen3VLConfig kwargs dict (nested v5 form)."""
    d = tiny_qwen3vl_config(**kwargs).to_hf_dict()
    for key in ("architectures", "model_type", "dtype"):
        d.pop(key)
    return d


def scramble_(module, seed: int = 0, scale: float = 0.1):
    """Overwrite every parameter with seeded random values (norm weights near 1, others ~N(0, scale)).

    Works on any nn.Module (ours or a transformers model): parity tests need weights far from the
    zeros/ones of a fresh init, or a swapped bias or norm would go unnoticed.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen).to(p.dtype)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(scale * noise if p.dim() > 1 else 0.5 * scale * noise)
    return module
