"""Qwen3-VL vision tower: patch embedding, learned position embeddings resampled to each image's grid,
ViT blocks with 2-D rotary attention, the patch merger (2x2 patches -> one LLM token) and the DeepStack
mergers whose outputs are added into the first decoder layers. Module names match HF keys under `visual.`.
The patch embedding, attention and block are shared with Qwen2.5-VL's tower (vision_qwen2_5.py).
"""
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ViTConfig, VisionConfig
from .rope import apply_rotary, vision_cos_sin, vision_positions

ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
}


class PatchEmbed(nn.Module):
    """A Conv3d with kernel == stride over one (C, tp, p, p) patch is a Linear over the flattened patch;
    we keep the Conv3d weight shape (the checkpoint's) and run it as a matmul. Qwen2.5-VL's has no bias."""

    def __init__(self, cfg: ViTConfig, bias: bool = True):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=bias)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight  # (C_out, C_in, tp, p, p)
        return F.linear(pixel_values.to(w.dtype), w.flatten(1), self.proj.bias)  # (N, C_out)


def interpolation_taps(hw: torch.Tensor, grid_thw: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear (align_corners=True) resampling of the side x side learned position table to each image's
    (h, w) grid, as gather indices and weights into the flattened table.

    hw (N, 2) the (row, col) of each patch (from rope.vision_positions) -> index, weight (N, 4) each.
    """
    sizes = torch.cat([torch.tensor([[h, w]]).expand(t * h * w, 2) for t, h, w in grid_thw.tolist()])
    sizes = sizes.to(hw.device).float()  # (N, 2) the grid each patch belongs to
    # align_corners: the first/last patch of a row or column sits exactly on the first/last table entry.
    src = hw.float() * (side - 1) / (sizes - 1).clamp(min=1)  # (N, 2) fractional table coordinates
    lo = src.floor()
    taps = torch.stack((lo, lo + 1), dim=-1)  # (N, 2 axes, 2 taps)
    weights = (1 - (src[..., None] - taps).abs()).clamp(min=0)  # linear hat kernel
    taps = taps.long().clamp(0, side - 1)  # the last row/col has weight 0 on its out-of-range tap
    index = taps[:, 0, :, None] * side + taps[:, 1, None, :]  # (N, 2, 2): row tap x col tap
    weight = weights[:, 0, :, None] * weights[:, 1, None, :]
    return index.flatten(1), weight.flatten(1)


class VisionAttention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.n_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x, cos, sin, seq_lens: list[int]):
        N, C = x.shape
        q, k, v = self.qkv(x).view(N, 3, self.n_heads, -1).unbind(1)  # (N, H, D) each
        # Rotary in fp32 (HF does the same), then back to the activation dtype.
        cos, sin = cos[:, None], sin[:, None]
        q = apply_rotary(q.float(), cos, sin).to(x.dtype)
        k = apply_rotary(k.float(), cos, sin).to(x.dtype)
        # Each segment (an image frame, or a window of one) attends only within itself: run them one by one.
        out = []
        for qs, ks, vs in zip(q.split(seq_lens), k.split(seq_lens), v.split(seq_lens)):
            qs, ks, vs = (t.transpose(0, 1)[None] for t in (qs, ks, vs))  # (1, H, n, D)
            out.append(F.scaled_dot_product_attention(qs, ks, vs)[0].transpose(0, 1))
        return self.proj(torch.cat(out).reshape(N, C))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x):
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    """Pre-norm ViT block. norm: the class of norm1/norm2 (Qwen3-VL: LayerNorm; Qwen2.5-VL: RMSNorm);
    make_mlp() builds the block's MLP (Qwen3-VL: VisionMLP; Qwen2.5-VL: a SwiGLU with biases). Built in this
    order, so that a seeded default init draws the same numbers as before the two towers shared this class."""

    def __init__(self, cfg: ViTConfig, norm: type, make_mlp):
        super().__init__()
        self.norm1 = norm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.norm2 = norm(cfg.hidden_size, eps=1e-6)
        self.mlp = make_mlp()

    def forward(self, x, cos, sin, seq_lens):
        x = x + self.attn(self.norm1(x), cos, sin, seq_lens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Concatenate each merge x merge block of patches (consecutive rows) and project to the LLM width.

    The main merger normalizes each patch before concatenating; the DeepStack mergers
    (postshuffle_norm=True) normalize the concatenated vector instead.
    """

    def __init__(self, cfg: VisionConfig, postshuffle_norm: bool):
        super().__init__()
        self.block_dim = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.postshuffle_norm = postshuffle_norm
        self.norm = nn.LayerNorm(self.block_dim if postshuffle_norm else cfg.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.block_dim, self.block_dim)
        self.linear_fc2 = nn.Linear(self.block_dim, cfg.out_hidden_size)

    def forward(self, x):  # (N, C) -> (N / merge^2, out)
        x = self.norm(x.view(-1, self.block_dim)) if self.postshuffle_norm else self.norm(x).view(-1, self.block_dim)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class VisionModel(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(cfg, nn.LayerNorm, partial(VisionMLP, cfg)) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, postshuffle_norm=False)
        self.deepstack_merger_list = nn.ModuleList(
            PatchMerger(cfg, postshuffle_norm=True) for _ in cfg.deepstack_visual_indexes)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
        """pixel_values (N, C*tp*p*p) patches in processor order; grid_thw (n_images, 3) patch grids.

        Returns (tokens (N / merge^2, out_hidden), [DeepStack features (N / merge^2, out_hidden)] * K).
        """
        cfg = self.cfg
        check_vision_inputs(pixel_values, grid_thw, cfg)
        x = self.patch_embed(pixel_values)  # (N, C)
        hw = vision_positions(grid_thw.cpu(), cfg.spatial_merge_size)  # (N, 2) row, col of each patch
        side = int(cfg.num_position_embeddings ** 0.5)
        index, weight = interpolation_taps(hw, grid_thw.cpu(), side)
        pos = (self.pos_embed(index.to(x.device)) * weight.to(x.device)[..., None]).sum(1)  # (N, C), fp32 weights
        x = x + pos.to(x.dtype)
        hw = hw.to(x.device)
        cos, sin = vision_cos_sin(hw, cfg.head_dim, cfg.rope_theta)  # (N, D)
        seq_lens = [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, seq_lens)
            if i in cfg.deepstack_visual_indexes:
                merger = self.deepstack_merger_list[cfg.deepstack_visual_indexes.index(i)]
                deepstack.append(merger(x))
        return self.merger(x), deepstack


def check_vision_inputs(pixel_values: torch.Tensor, grid_thw: torch.Tensor, cfg: ViTConfig) -> None:
    """Clear errors for pixel_values / image_grid_thw that do not fit each other or the vision config."""
    patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    if pixel_values.dim() != 2 or pixel_values.shape[1] != patch_dim:
        raise ValueError(f"pixel_values must be (n_patches, {patch_dim}) for patch_size {cfg.patch_size}, "
                         f"got {tuple(pixel_values.shape)}")
    grids = grid_thw.tolist()
    if sum(t * h * w for t, h, w in grids) != pixel_values.shape[0]:
        raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches but image_grid_thw {grids} "
                         f"describes {sum(t * h * w for t, h, w in grids)}")
    m = cfg.spatial_merge_size
    if any(h % m or w % m for _, h, w in grids):
        raise ValueError(f"image_grid_thw {grids}: h and w must be multiples of spatial_merge_size {m}")
