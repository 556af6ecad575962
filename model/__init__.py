"""Pure-PyTorch vision-language models (Qwen3-VL, Qwen2.5-VL) with Hugging Face checkpoint I/O.

    import model
    m = model.load("/path/to/Qwen3-VL-2B-Thinking", device="cuda", dtype=torch.bfloat16)  # or a Qwen2.5-VL dir
    logits = m(input_ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid)
"""
from .checkpoint import ARCHITECTURES, load, read_config, save
from .config import Qwen2_5_VisionConfig, Qwen2_5_VLConfig, Qwen3VLConfig, TextConfig, VisionConfig
from .kv_cache import KVCache
from .qwen2_5_vl import Qwen2_5_VL
from .qwen3_vl import Qwen3VL

__all__ = ["ARCHITECTURES", "KVCache", "Processor", "Qwen2_5_VL", "Qwen2_5_VLConfig", "Qwen2_5_VisionConfig",
           "Qwen3VL", "Qwen3VLConfig", "TextConfig", "VisionConfig", "load", "load_processor", "read_config", "save"]


def __getattr__(name):
    # The processor (model/processor.py) pulls in tokenizers and PIL; import it only when asked for.
    if name in ("Processor", "load_processor"):
        from . import processor
        return getattr(processor, name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
