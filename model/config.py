"""Model configs as dataclasses, read from / written to a Hugging Face config.json.

`Qwen3VLConfig.from_hf_dict(d)` accepts the nested v5 form (`text_config` / `vision_config`) and the flat
legacy form (text fields at the top level, `rope_theta` + `rope_scaling` instead of `rope_parameters`);
`to_hf_dict()` always writes the nested form that transformers 5.23 loads.
"""
from dataclasses import dataclass, field, fields


@dataclass
class VisionConfig:
    depth: int = 27                     # number of ViT blocks
    hidden_size: int = 1152             # ViT width
    intermediate_size: int = 4304       # ViT MLP width
    num_heads: int = 16                 # ViT attention heads (head_dim = hidden_size // num_heads)
    hidden_act: str = "gelu_pytorch_tanh"  # ViT MLP activation (the mergers always use exact GELU)
    in_channels: int = 3
    patch_size: int = 16                # spatial patch side in pixels
    temporal_patch_size: int = 2        # frames per patch; an image is repeated to fill them
    spatial_merge_size: int = 2         # merge s x s patches into one LLM token
    out_hidden_size: int = 3584         # merger output width = text hidden_size
    num_position_embeddings: int = 2304  # learned position table, a square grid (48 x 48)
    deepstack_visual_indexes: tuple = (8, 16, 24)  # ViT blocks whose outputs feed DeepStack mergers
    rope_theta: float = 10000.0         # base of the 2-D rotary embedding

    def __post_init__(self):
        self.deepstack_visual_indexes = tuple(int(i) for i in self.deepstack_visual_indexes)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if (self.hidden_size // self.num_heads) % 4:
            raise ValueError("vision head_dim must be divisible by 4 (2-D rotary splits it into h and w halves)")
        side = int(self.num_position_embeddings ** 0.5)
        if side * side != self.num_position_embeddings:
            raise ValueError(f"num_position_embeddings {self.num_position_embeddings} is not a square number")
        bad = [i for i in self.deepstack_visual_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"deepstack_visual_indexes {bad} out of range for depth {self.depth}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class TextConfig:
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016      # SwiGLU width
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32       # GQA: key/value heads shared by num_attention_heads // this queries
    head_dim: int = 128
    hidden_act: str = "silu"            # SwiGLU gate activation; only silu is supported
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5000000.0
    mrope_section: tuple = (24, 20, 20)  # rotary frequency pairs given to (t, h, w); sums to head_dim // 2
    max_position_embeddings: int = 128000
    # Flags that let Qwen2.5-VL's decoder share this code: Qwen3 has q/k RMSNorm and no biases;
    # Qwen2.5 has no q/k norm, biases on q/k/v, none on o.
    qk_norm: bool = True
    qkv_bias: bool = False
    o_bias: bool = False
    attn_impl: str = "sdpa"             # "sdpa" (torch SDPA) or "eager" (explicit matmul/softmax, the test oracle)

    def __post_init__(self):
        self.mrope_section = tuple(int(s) for s in self.mrope_section)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if len(self.mrope_section) != 3 or sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(f"mrope_section {list(self.mrope_section)} must have 3 entries summing to "
                             f"head_dim // 2 = {self.head_dim // 2}")
        if self.hidden_act != "silu":
            raise ValueError(f"text hidden_act {self.hidden_act!r} not supported (only 'silu')")
        if self.attn_impl not in ("sdpa", "eager"):
            raise ValueError(f"attn_impl must be 'sdpa' or 'eager', got {self.attn_impl!r}")


@dataclass
class Qwen3VLConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    image_token_id: int = 151655        # <|image_pad|>: one per merged image token
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False   # lm_head shares embed_tokens' weight

    model_type = "qwen3_vl"

    def __post_init__(self):
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ValueError(f"vision out_hidden_size {self.vision.out_hidden_size} != text hidden_size "
                             f"{self.text.hidden_size}")

    # ---- Hugging Face config.json <-> ours ----
    @classmethod
    def from_hf_dict(cls, d: dict) -> "Qwen3VLConfig":
        """Parse a Qwen3-VL config.json dict (nested v5 or flat legacy form)."""
        # Flat legacy form: the text fields sit at the top level next to vision_config.
        text = d.get("text_config") or {k: v for k, v in d.items() if k != "vision_config"}
        vision = d.get("vision_config") or {}
        tie = d.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        return cls(
            text=_text_from_hf(text),
            vision=_vision_from_hf(vision),
            image_token_id=d.get("image_token_id", 151655),
            video_token_id=d.get("video_token_id", 151656),
            vision_start_token_id=d.get("vision_start_token_id", 151652),
            vision_end_token_id=d.get("vision_end_token_id", 151653),
            tie_word_embeddings=bool(tie),
        )

    def to_hf_dict(self, dtype: str = "float32") -> dict:
        """The nested v5 config.json that transformers' Qwen3VLConfig loads."""
        t, v = self.text, self.vision
        if t.qkv_bias != t.o_bias or not t.qk_norm:
            raise ValueError("a Qwen3-VL config needs qk_norm=True and qkv_bias == o_bias (attention_bias)")
        text_config = {
            "model_type": "qwen3_vl_text",
            "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads, "head_dim": t.head_dim, "hidden_act": t.hidden_act,
            "rms_norm_eps": t.rms_norm_eps, "max_position_embeddings": t.max_position_embeddings,
            "attention_bias": t.qkv_bias, "attention_dropout": 0.0,
            "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                                "mrope_section": list(t.mrope_section), "mrope_interleaved": True},
        }
        vision_config = {
            "model_type": "qwen3_vl_vision",
            "depth": v.depth, "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads, "hidden_act": v.hidden_act, "in_channels": v.in_channels,
            "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size, "out_hidden_size": v.out_hidden_size,
            "num_position_embeddings": v.num_position_embeddings,
            "deepstack_visual_indexes": list(v.deepstack_visual_indexes),
            "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
        }
        return {
            "architectures": ["Qwen3VLForConditionalGeneration"],
            "model_type": self.model_type,
            "dtype": dtype,
            "text_config": text_config,
            "vision_config": vision_config,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
        }


def _rope_from_hf(d: dict, default_theta: float) -> dict:
    """rope_parameters (v5) or rope_theta + rope_scaling (legacy) -> one dict with rope_theta."""
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    rope.setdefault("rope_theta", d.get("rope_theta", default_theta))
    kind = rope.get("rope_type", rope.get("type", "default"))
    # Qwen2-VL-era configs spell plain M-RoPE as type "mrope"; the frequencies are the default ones.
    if kind not in ("default", "mrope", "axial"):
        raise NotImplementedError(f"rope_type {kind!r} is not supported (only default rotary frequencies)")
    return rope


def _pick(cls, d: dict) -> dict:
    """The entries of d that are fields of dataclass cls."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def _text_from_hf(d: dict) -> TextConfig:
    rope = _rope_from_hf(d, TextConfig.rope_theta)
    kw = _pick(TextConfig, d)
    for k in ("rope_theta", "mrope_section", "qk_norm", "qkv_bias", "o_bias", "attn_impl"):
        kw.pop(k, None)  # set below from the HF spelling
    if kw.get("num_key_value_heads") is None:
        kw["num_key_value_heads"] = d.get("num_attention_heads", TextConfig.num_attention_heads)
    if "head_dim" not in d and "hidden_size" in d:
        kw["head_dim"] = d["hidden_size"] // d.get("num_attention_heads", TextConfig.num_attention_heads)
    bias = bool(d.get("attention_bias", False))  # Qwen3: one flag for q, k, v and o
    return TextConfig(**kw, rope_theta=float(rope["rope_theta"]),
                      mrope_section=tuple(rope.get("mrope_section", (24, 20, 20))),
                      qk_norm=True, qkv_bias=bias, o_bias=bias)


def _vision_from_hf(d: dict) -> VisionConfig:
    rope = _rope_from_hf(d, VisionConfig.rope_theta)
    kw = _pick(VisionConfig, d)
    kw.pop("rope_theta", None)
    # HF aliases: num_attention_heads -> num_heads, num_hidden_layers -> depth.
    if "num_heads" not in kw and "num_attention_heads" in d:
        kw["num_heads"] = d["num_attention_heads"]
    if "depth" not in kw and "num_hidden_layers" in d:
        kw["depth"] = d["num_hidden_layers"]
    return VisionConfig(**kw, rope_theta=float(rope["rope_theta"]))
