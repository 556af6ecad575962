"""Tiny Qwen3-VL and Qwen2.5-VL configs built in code, for the tests (no downloads).

`tiny_qwen3vl_config(...)` / `tiny_qwen2_5vl_config(...)` return our config objects; `tiny_qwen3vl_hf_dict(...)` /
`tiny_qwen2_5vl_hf_dict(...)` the same models as dicts that transformers' `Qwen3VLConfig(**d)` /
`Qwen2_5_VLConfig(**d)` accept (and that our `from_hf_dict` reads back).
Token ids are parameters so they can follow a tokenizer built by model/tokenizer.py.
"""
import torch

from model.config import QWEN2_5_DECODER, Qwen2_5_VisionConfig, Qwen2_5_VLConfig, Qwen3VLConfig, TextConfig, VisionConfig


def _tiny_text(vocab_size: int, hidden_size: int, text_layers: int, head_dim: int, mrope_section,
               **arch) -> TextConfig:
    """4 query heads, 2 kv heads, SwiGLU 2x wide; `arch`: the decoder flags of the architecture."""
    return TextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
        rope_theta=10000.0, mrope_section=mrope_section, max_position_embeddings=4096, **arch)


def _tiny_vit(vision_hidden_size: int, vision_depth: int, patch_size: int, hidden_size: int) -> dict:
    """The ViT fields both tiny towers share: 2 heads (head_dim 16 at width 32), MLP 2x wide, 2x2 merge."""
    return dict(depth=vision_depth, hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size,
                num_heads=2, patch_size=patch_size, temporal_patch_size=2, spatial_merge_size=2,
                out_hidden_size=hidden_size)


def tiny_qwen3vl_config(vocab_size: int = 512, image_token_id: int = 505, video_token_id: int = 506,
                        vision_start_token_id: int = 503, vision_end_token_id: int = 504,
                        tie_word_embeddings: bool = False, patch_size: int = 16, text_layers: int = 2,
                        hidden_size: int = 64, vision_hidden_size: int = 32, vision_depth: int = 3,
                        deepstack_visual_indexes=(0, 1), num_position_embeddings: int = 64) -> Qwen3VLConfig:
    """~0.2M parameters (plus vocab_size * 64 * 2): 2 text layers of width 64 (4 query heads, 2 kv heads,
    head_dim 16), a 3-block ViT of width 32 with DeepStack taps after blocks 0 and 1."""
    # mrope_section sums to head_dim // 2 = 8 frequency pairs.
    return Qwen3VLConfig(
        text=_tiny_text(vocab_size, hidden_size, text_layers, head_dim=16, mrope_section=(3, 3, 2)),
        vision=VisionConfig(**_tiny_vit(vision_hidden_size, vision_depth, patch_size, hidden_size),
                            num_position_embeddings=num_position_embeddings,
                            deepstack_visual_indexes=tuple(deepstack_visual_indexes)),
        image_token_id=image_token_id, video_token_id=video_token_id, vision_start_token_id=vision_start_token_id,
        vision_end_token_id=vision_end_token_id, tie_word_embeddings=tie_word_embeddings)


def tiny_qwen2_5vl_config(vocab_size: int = 512, image_token_id: int = 505, video_token_id: int = 506,
                          vision_start_token_id: int = 503, vision_end_token_id: int = 504,
                          tie_word_embeddings: bool = False, patch_size: int = 14, text_layers: int = 2,
                          hidden_size: int = 64, vision_hidden_size: int = 32, vision_depth: int = 3,
                          window_size: int | None = None, fullatt_block_indexes=(1,)) -> Qwen2_5_VLConfig:
    """The same sizes as tiny_qwen3vl_config with Qwen2.5-VL's decoder (q/k/v biases, no q/k norm, contiguous
    M-RoPE) and ViT: windows of 2 x 2 merged tokens (window_size = 4 * patch_size) in blocks 0 and 2, full
    attention in block 1, so an image of more than 2 x 2 merged tokens is split into several windows."""
    head_dim = hidden_size // 4  # Qwen2.5: always hidden_size // num_attention_heads
    pairs = head_dim // 2
    t_pairs, h_pairs = pairs // 4, (pairs - pairs // 4) // 2  # about the 16 : 24 : 24 split of the releases
    mrope_section = (t_pairs, h_pairs, pairs - t_pairs - h_pairs)  # (2, 3, 3) at width 64
    return Qwen2_5_VLConfig(
        text=_tiny_text(vocab_size, hidden_size, text_layers, head_dim, mrope_section, **QWEN2_5_DECODER),
        vision=Qwen2_5_VisionConfig(**_tiny_vit(vision_hidden_size, vision_depth, patch_size, hidden_size),
                                    window_size=4 * patch_size if window_size is None else window_size,
                                    fullatt_block_indexes=tuple(fullatt_block_indexes)),
        image_token_id=image_token_id, video_token_id=video_token_id, vision_start_token_id=vision_start_token_id,
        vision_end_token_id=vision_end_token_id, tie_word_embeddings=tie_word_embeddings)


def _hf_kwargs(config) -> dict:
    """config.json minus the entries that are not constructor arguments of transformers' config class."""
    d = config.to_hf_dict()
    for key in ("architectures", "model_type", "dtype", "torch_dtype"):
        d.pop(key, None)
    return d


def tiny_qwen3vl_hf_dict(**kwargs) -> dict:
    """The same tiny model as a transformers Qwen3VLConfig kwargs dict (nested v5 form)."""
    return _hf_kwargs(tiny_qwen3vl_config(**kwargs))


def tiny_qwen2_5vl_hf_dict(**kwargs) -> dict:
    """The same tiny model as a transformers Qwen2_5_VLConfig kwargs dict (the flat form of the releases)."""
    return _hf_kwargs(tiny_qwen2_5vl_config(**kwargs))


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


def tiny_hf(arch: str, tie: bool = False, seed: int = 1, patch_size: int = 8):
    """A tiny transformers model of `arch` ("qwen3_vl" | "qwen2_5_vl"), scrambled (parity tests' reference); tie=True
    shares lm_head with the embedding (as Qwen3-VL-2B / Qwen2.5-VL-3B)."""
    if arch == "qwen3_vl":
        from transformers import Qwen3VLConfig as HFConfig
        from transformers import Qwen3VLForConditionalGeneration as HFModel
        d = tiny_qwen3vl_hf_dict(patch_size=patch_size, tie_word_embeddings=tie)
    else:
        from transformers import Qwen2_5_VLConfig as HFConfig
        from transformers import Qwen2_5_VLForConditionalGeneration as HFModel
        d = tiny_qwen2_5vl_hf_dict(patch_size=patch_size, tie_word_embeddings=tie)
    torch.manual_seed(0)
    return scramble_(HFModel(HFConfig(**d)), seed=seed).eval()
