"""The Qwen-VL model around a vision tower: image tokens scattered into the text embeddings -> decoder with
M-RoPE (+ DeepStack injection where the tower gives features for it) -> lm_head. Everything here is shared by
Qwen3-VL (qwen3_vl.py) and Qwen2.5-VL (qwen2_5_vl.py); a subclass names its config, vision tower and
checkpoint key names.
"""
import torch
import torch.nn as nn

from .decoder import TextModel, causal_mask
from .kv_cache import KVCache
from .rope import mrope_cos_sin, rope_index


# Checkpoint key prefix -> our module prefix, in the two layouts transformers has used: the v5 module paths,
# and the Qwen2-VL-era names (`visual.*` and `model.layers.*` at the top level) of the released Qwen2.5-VL.
V5_KEYS = (("model.visual.", "visual."), ("model.language_model.", "language_model."), ("lm_head.", "lm_head."))
LEGACY_KEYS = (("visual.", "visual."), ("model.", "language_model."), ("lm_head.", "lm_head."))


class QwenVL(nn.Module):
    config_class = None     # a config.VLConfig subclass: parses config.json, writes it back
    vision_class = None     # the vision tower: module(vision config), forward(pixels, grid) -> (tokens, [DeepStack])
    # (checkpoint prefix, our prefix) pairs. A key takes the longest prefix it starts with; `save` writes the
    # first spelling listed for each of our prefixes.
    hf_key_prefixes = V5_KEYS + LEGACY_KEYS

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.visual = self.vision_class(config.vision)
        self.language_model = TextModel(config.text)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with lm_head when the config says so (again after loading replaces params)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int | None = None) -> "QwenVL":
        """Fresh-model init as HF does it: weights ~N(0, std), biases 0, norm scales 1 (for training from
        scratch, e.g. the toy world; a loaded checkpoint never needs it)."""
        gen = None if seed is None else torch.Generator(device=self.device).manual_seed(seed)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv3d, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=gen)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif hasattr(module, "weight") and module.weight is not None and module.weight.dim() == 1:
                module.weight.fill_(1.0)  # RMSNorm / LayerNorm scale
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def decoder_blocks(self) -> list[nn.Module]:
        """The text decoder layers: the units FSDP shards and activation checkpointing wraps."""
        return list(self.language_model.layers)

    # ---- pieces the sampler / trainer can call on their own ----
    def rope_index(self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(position_ids (3, B, T), rope_deltas (B, 1)), equal to HF's get_rope_index. See rope.rope_index."""
        return rope_index(input_ids, image_grid_thw, attention_mask, self.config.image_token_id,
                          self.config.vision.spatial_merge_size)

    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor):
        """Vision tower + mergers: (image tokens (n_tokens, C), [DeepStack features (n_tokens, C)] * K), K = 0
        for a tower without DeepStack (Qwen2.5-VL)."""
        return self.visual(pixel_values.to(self.dtype), image_grid_thw)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty KVCache shaped for this model (dtype, device, attention implementation)."""
        t = self.config.text
        return KVCache(t.num_hidden_layers, batch_size, t.num_key_value_heads, max_len, t.head_dim,
                       dtype=self.dtype, device=self.device, attn_impl=t.attn_impl)

    # ---- forward ----
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None, cache=None, logits_to_keep: int = 0,
                image_mask: torch.Tensor | None = None, return_hidden: bool = False) -> torch.Tensor:
        """input_ids (B, T); attention_mask (B, T) 1 = real token; position_ids (3, B, T) or None to compute
        them with rope_index (offset by the cache's next_position when decoding); pixel_values/image_grid_thw
        for the images whose <|image_pad|> tokens are in input_ids; cache: a KVCache-like object (see
        kv_cache.py) that this call appends to. image_mask (B, T) bool: which positions take image features
        (default: every <|image_pad|> token; training passes the prompt's only, because a policy can sample
        that token id in its response, where it is plain text as it was when sampled).
        Returns logits (B, T or logits_to_keep, vocab), or with return_hidden the final hidden states (B, T or
        logits_to_keep, C) that the LM head would turn into them (the training forward's log-probs never make the
        whole logits, logprobs.head_logprobs)."""
        real = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                else attention_mask.to(input_ids.device).bool())
        x = self.language_model.embed_tokens(input_ids)  # (B, T, C)

        deepstack = None
        if pixel_values is not None:
            if image_grid_thw is None:
                raise ValueError("pixel_values given without image_grid_thw")
            image_tokens, deepstack_features = self.encode_images(pixel_values, image_grid_thw)
            is_image = input_ids == self.config.image_token_id if image_mask is None else image_mask.bool()  # (B, T)
            if int(is_image.sum()) != image_tokens.shape[0]:
                raise ValueError(f"input_ids hold {int(is_image.sum())} image tokens (id "
                                 f"{self.config.image_token_id}) but the images give {image_tokens.shape[0]}")
            # Image tokens fill the <|image_pad|> slots in row-major order, the order rope_index assumes.
            x = x.masked_scatter(is_image[..., None], image_tokens.to(x.dtype))
            if deepstack_features:
                deepstack = (is_image, deepstack_features)

        if position_ids is None:
            grid = image_grid_thw if pixel_values is not None else None
            position_ids, _ = self.rope_index(input_ids, grid, real)
            if cache is not None:  # continue from where the cached tokens left off
                position_ids = position_ids + (cache.next_position[None, :, None] * real).to(position_ids.device)
        if cache is not None:
            # Rows with a real new token continue after its position; others keep theirs.
            last = position_ids.masked_fill(~real[None], -1).amax(dim=(0, 2)) + 1  # (B,)
            cache.append(real, torch.where(real.any(-1), last, cache.next_position))

        t = self.config.text
        cos, sin = mrope_cos_sin(position_ids, t.head_dim, t.rope_theta, t.mrope_section, x.dtype,
                                 t.mrope_interleaved)  # (B, T, D), sin signed for apply_rotary
        mask = None if cache is not None else causal_mask(real)
        h = self.language_model(x, cos, sin, mask, cache, deepstack)  # (B, T, C)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return h if return_hidden else self.lm_head(h)
