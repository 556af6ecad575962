"""Model configs as dataclasses, read from / written to a Hugging Face config.json.

Both architectures share `TextConfig` (one decoder; flags say where Qwen3 and Qwen2.5 differ) and the ViT fields
of `ViTConfig`. `Qwen3VLConfig.from_hf_dict(d)` and `Qwen2_5_VLConfig.from_hf_dict(d)` accept the nested v5 form
(`text_config` / `vision_config`) and the flat legacy form (text fields at the top level, `rope_theta` +
`rope_scaling` instead of `rope_parameters`); keys a file leaves out take transformers' class defaults.
`to_hf_dict()` writes the form each family's checkpoints use: nested for Qwen3-VL, flat (as the released
Qwen2.5-VL checkpoints) for Qwen2.5-VL. transformers 5.23 loads both.
"""
from dataclasses import asdict, dataclass, field, fields


@dataclass
class ViTConfig:
    """The fields both vision towers have. Defaults: transformers' Qwen3-VL vision config."""
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
    rope_theta: float = 10000.0         # base of the 2-D rotary embedding

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if (self.hidden_size // self.num_heads) % 4:
            raise ValueError("vision head_dim must be divisible by 4 (2-D rotary splits it into h and w halves)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class VisionConfig(ViTConfig):
    """Qwen3-VL's ViT: a learned position table resampled to each grid, DeepStack taps."""
    num_position_embeddings: int = 2304  # learned position table, a square grid (48 x 48)
    deepstack_visual_indexes: tuple = (8, 16, 24)  # ViT blocks whose outputs feed DeepStack mergers

    def __post_init__(self):
        super().__post_init__()
        self.deepstack_visual_indexes = tuple(int(i) for i in self.deepstack_visual_indexes)
        side = int(self.num_position_embeddings ** 0.5)
        if side * side != self.num_position_embeddings:
            raise ValueError(f"num_position_embeddings {self.num_position_embeddings} is not a square number")
        _check_block_indexes("deepstack_visual_indexes", self.deepstack_visual_indexes, self.depth)


@dataclass
class Qwen2_5_VisionConfig(ViTConfig):
    """Qwen2.5-VL's ViT: RMSNorm + SwiGLU blocks, no position table; attention within windows of
    window_size x window_size pixels except in the fullatt_block_indexes blocks. Defaults: transformers'."""
    depth: int = 32
    hidden_size: int = 3584             # transformers' default; the released checkpoints use 1280
    intermediate_size: int = 3420
    hidden_act: str = "silu"
    patch_size: int = 14
    window_size: int = 112              # window side in pixels: 112 / 14 / 2 = 4 x 4 merged tokens per window
    fullatt_block_indexes: tuple = (7, 15, 23, 31)  # blocks that attend over the whole image
    tokens_per_second: int = 4          # video-only temporal position spacing; kept so the config round-trips

    def __post_init__(self):
        super().__post_init__()
        self.fullatt_block_indexes = tuple(int(i) for i in self.fullatt_block_indexes)
        if self.window_tokens < 1:
            raise ValueError(f"window_size {self.window_size} is smaller than one merged token "
                             f"({self.spatial_merge_size} x patch_size {self.patch_size} pixels)")
        _check_block_indexes("fullatt_block_indexes", self.fullatt_block_indexes, self.depth)

    @property
    def window_tokens(self) -> int:
        """Window side in merged (LLM) tokens, floored as transformers does."""
        return self.window_size // self.spatial_merge_size // self.patch_size


def _check_block_indexes(name: str, indexes: tuple, depth: int) -> None:
    bad = [i for i in indexes if not 0 <= i < depth]
    if bad:
        raise ValueError(f"{name} {bad} out of range for depth {depth}")


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
    # M-RoPE layout: Qwen3-VL interleaves t/h/w over the frequency pairs (t h w t h w ...); Qwen2-VL and
    # Qwen2.5-VL give each axis a contiguous block of mrope_section[i] pairs.
    mrope_interleaved: bool = True
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


# The decoder flags of the Qwen2 architecture (Qwen2.5-VL's text model), and transformers' Qwen2_5_VLTextConfig
# defaults. Qwen2.5's attention always uses head_dim = hidden_size // num_attention_heads (a head_dim key in
# config.json is ignored).
QWEN2_5_DECODER = dict(qk_norm=False, qkv_bias=True, o_bias=False, mrope_interleaved=False)
QWEN2_5_TEXT = dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                    num_attention_heads=64, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                    rope_theta=1000000.0, mrope_section=(16, 24, 24), max_position_embeddings=32768,
                    **QWEN2_5_DECODER)


@dataclass
class VLConfig:
    """What every Qwen-VL config holds: the decoder and vision configs, the vision token ids, lm_head tying.
    Subclasses give the architecture's sub-config parsers and the config.json it writes."""
    text: TextConfig = field(default_factory=TextConfig)
    vision: ViTConfig = field(default_factory=ViTConfig)
    image_token_id: int = 151655        # <|image_pad|>: one per merged image token
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False   # lm_head shares embed_tokens' weight

    model_type = None
    token_id_keys = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")

    def __post_init__(self):
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ValueError(f"vision out_hidden_size {self.vision.out_hidden_size} != text hidden_size "
                             f"{self.text.hidden_size}")

    @classmethod
    def from_hf_dict(cls, d: dict) -> "VLConfig":
        """Parse a config.json dict (nested v5 or flat legacy form)."""
        # Flat legacy form: the text fields sit at the top level next to vision_config.
        text = d.get("text_config") or {k: v for k, v in d.items() if k != "vision_config"}
        ids = {k: d.get(k, getattr(cls, k)) for k in cls.token_id_keys}
        return cls(text=cls.text_from_hf(text), vision=cls.vision_from_hf(d.get("vision_config") or {}),
                   tie_word_embeddings=cls.tied_in_hf(d, text), **ids)

    def hf_common(self) -> dict:
        """The top-level config.json entries both architectures write."""
        return {**{k: getattr(self, k) for k in self.token_id_keys}, "tie_word_embeddings": self.tie_word_embeddings}


@dataclass
class Qwen3VLConfig(VLConfig):
    vision: VisionConfig = field(default_factory=VisionConfig)

    model_type = "qwen3_vl"

    @staticmethod
    def text_from_hf(d: dict) -> TextConfig:
        bias = bool(d.get("attention_bias", False))  # Qwen3: one flag for q, k, v and o
        return _text_from_hf(d, TextConfig(), qk_norm=True, qkv_bias=bias, o_bias=bias, mrope_interleaved=True)

    @staticmethod
    def vision_from_hf(d: dict) -> VisionConfig:
        return _vision_from_hf(d, VisionConfig)

    @staticmethod
    def tied_in_hf(d: dict, text: dict) -> bool:
        return bool(d.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))

    def to_hf_dict(self, dtype: str = "float32") -> dict:
        """The nested v5 config.json that transformers' Qwen3VLConfig loads."""
        t, v = self.text, self.vision
        if t.qkv_bias != t.o_bias or not t.qk_norm or not t.mrope_interleaved:
            raise ValueError("a Qwen3-VL config needs qk_norm=True, mrope_interleaved=True and "
                             "qkv_bias == o_bias (attention_bias)")
        text_config = {
            "model_type": "qwen3_vl_text", **_hf_text_fields(t), "head_dim": t.head_dim,
            "attention_bias": t.qkv_bias, "attention_dropout": 0.0,
            "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                                "mrope_section": list(t.mrope_section), "mrope_interleaved": True},
        }
        vision_config = {
            "model_type": "qwen3_vl_vision", **_hf_vision_fields(v),
            "num_position_embeddings": v.num_position_embeddings,
            "deepstack_visual_indexes": list(v.deepstack_visual_indexes),
            "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
        }
        return {"architectures": ["Qwen3VLForConditionalGeneration"], "model_type": self.model_type,
                "dtype": dtype, "text_config": text_config, "vision_config": vision_config, **self.hf_common()}


@dataclass
class Qwen2_5_VLConfig(VLConfig):
    text: TextConfig = field(default_factory=lambda: TextConfig(**QWEN2_5_TEXT))
    vision: Qwen2_5_VisionConfig = field(default_factory=Qwen2_5_VisionConfig)

    model_type = "qwen2_5_vl"

    @staticmethod
    def text_from_hf(d: dict) -> TextConfig:
        if d.get("use_sliding_window"):
            raise NotImplementedError("use_sliding_window=true is not supported (the released Qwen2.5-VL "
                                      "checkpoints have it false)")
        base = TextConfig(**QWEN2_5_TEXT)
        hidden, heads = d.get("hidden_size", base.hidden_size), d.get("num_attention_heads", base.num_attention_heads)
        if hidden % heads:
            raise ValueError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        return _text_from_hf({**d, "head_dim": hidden // heads}, base, **QWEN2_5_DECODER)

    @staticmethod
    def vision_from_hf(d: dict) -> Qwen2_5_VisionConfig:
        return _vision_from_hf(d, Qwen2_5_VisionConfig)

    @staticmethod
    def tied_in_hf(d: dict, text: dict) -> bool:
        # transformers: tied when the top level says so, or a pre-v5 text_config does.
        return bool(d.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))

    def to_hf_dict(self, dtype: str = "float32") -> dict:
        """The flat config.json of the released Qwen2.5-VL checkpoints (read by transformers 4.x and 5.x)."""
        t, v = self.text, self.vision
        if any(getattr(t, k) != want for k, want in QWEN2_5_DECODER.items()) or \
                t.head_dim * t.num_attention_heads != t.hidden_size:
            raise ValueError(f"a Qwen2.5-VL config needs {QWEN2_5_DECODER} and "
                             f"head_dim * num_attention_heads == hidden_size")
        vision_config = {
            "model_type": "qwen2_5_vl_vision", **_hf_vision_fields(v), "window_size": v.window_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes), "tokens_per_second": v.tokens_per_second,
            "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
        }
        return {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": self.model_type,
                "torch_dtype": dtype, **_hf_text_fields(t), "attention_dropout": 0.0, "use_sliding_window": False,
                "rope_theta": t.rope_theta, "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
                "vision_config": vision_config, **self.hf_common()}


# ---- Hugging Face config.json -> ours ----

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


def _text_from_hf(d: dict, base: TextConfig, **arch) -> TextConfig:
    """TextConfig from an HF text config dict. Keys d leaves out keep base's values (the architecture's HF
    defaults); `arch` are the decoder flags the architecture fixes (q/k norm, biases, M-RoPE layout)."""
    rope = _rope_from_hf(d, base.rope_theta)
    kw = {**asdict(base), **_pick(TextConfig, d), **arch, "attn_impl": base.attn_impl}
    kw["rope_theta"] = float(rope["rope_theta"])
    kw["mrope_section"] = tuple(rope.get("mrope_section", base.mrope_section))
    if kw["num_key_value_heads"] is None:  # transformers: None means one kv head per query head
        kw["num_key_value_heads"] = kw["num_attention_heads"]
    if "head_dim" not in d and "hidden_size" in d:
        kw["head_dim"] = kw["hidden_size"] // kw["num_attention_heads"]
    return TextConfig(**kw)


def _vision_from_hf(d: dict, cls):
    rope = _rope_from_hf(d, cls.rope_theta)
    kw = _pick(cls, d)
    kw.pop("rope_theta", None)
    # HF aliases: num_attention_heads -> num_heads, num_hidden_layers -> depth.
    if "num_heads" not in kw and "num_attention_heads" in d:
        kw["num_heads"] = d["num_attention_heads"]
    if "depth" not in kw and "num_hidden_layers" in d:
        kw["depth"] = d["num_hidden_layers"]
    return cls(**kw, rope_theta=float(rope["rope_theta"]))


# ---- ours -> Hugging Face config.json: the entries both architectures spell the same ----

def _hf_text_fields(t: TextConfig) -> dict:
    return {"vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads, "hidden_act": t.hidden_act,
            "rms_norm_eps": t.rms_norm_eps, "max_position_embeddings": t.max_position_embeddings}


def _hf_vision_fields(v: ViTConfig) -> dict:
    return {"depth": v.depth, "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads, "hidden_act": v.hidden_act, "in_channels": v.in_channels,
            "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size, "out_hidden_size": v.out_hidden_size}
