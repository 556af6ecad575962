"""Qwen2.5-VL vision tower: patch embedding (no bias, no position table), RMSNorm + SwiGLU ViT blocks with 2-D
rotary attention inside windows (full attention in the fullatt_block_indexes blocks), and the 2x2 patch merger.
Module names match HF keys under `visual.`; the patch embedding, attention and block come from vision.py.

Window attention (Qwen2.5-VL report, section 2.1): the image's merged-token grid is cut into tiles of
window_tokens x window_tokens (the last row / column of tiles is cut short where the grid does not divide).
The patches are reordered tile by tile (`window_order`), so that each tile is one contiguous segment of the
sequence; every block runs on that order, and the merger output is put back in the processor's order at the end.
"""
from functools import partial

import torch
import torch.nn as nn

from .config import Qwen2_5_VisionConfig
from .decoder import MLP, RMSNorm
from .rope import vision_cos_sin, vision_positions
from .vision import ACTIVATIONS, PatchEmbed, VisionBlock, check_vision_inputs


def window_order(grid_thw: torch.Tensor, merge: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """The window-by-window order of the merged tokens of a batch of images, and the window lengths.

    grid_thw (n_images, 3) patch grids; window: tile side in merged tokens. Returns order (n_tokens,) long,
    where order[j] is the processor-order index of the token that goes to position j (tiles row-major, tokens
    row-major inside a tile, frames one after another), and the patch count of each tile (tokens * merge^2),
    the attention segments of the windowed blocks. Same order as transformers' get_vision_window_index.
    """
    order, lengths, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        tokens = torch.arange(t * (h // merge) * (w // merge)).view(t, h // merge, w // merge) + offset
        for frame in tokens:
            for band in frame.split(window, dim=0):  # a row of tiles
                for tile in band.split(window, dim=1):
                    order.append(tile.flatten())
                    lengths.append(tile.numel() * merge * merge)
        offset += tokens.numel()
    return torch.cat(order), lengths


class PatchMerger(nn.Module):
    """RMSNorm each patch, concatenate each merge x merge block (consecutive rows), MLP to the LLM width."""

    def __init__(self, cfg: Qwen2_5_VisionConfig):
        super().__init__()
        self.block_dim = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.ln_q = RMSNorm(cfg.hidden_size, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.block_dim, self.block_dim), nn.GELU(),
                                 nn.Linear(self.block_dim, cfg.out_hidden_size))

    def forward(self, x):  # (N, C) -> (N / merge^2, out)
        return self.mlp(self.ln_q(x).view(-1, self.block_dim))


class Qwen2_5_VisionModel(nn.Module):
    def __init__(self, cfg: Qwen2_5_VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg, bias=False)
        mlp = partial(MLP, cfg.hidden_size, cfg.intermediate_size, bias=True, act=ACTIVATIONS[cfg.hidden_act])
        self.blocks = nn.ModuleList(VisionBlock(cfg, RMSNorm, mlp) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
        """pixel_values (N, C*tp*p*p) patches in processor order; grid_thw (n_images, 3) patch grids.

        Returns (tokens (N / merge^2, out_hidden) in processor order, []): no DeepStack features.
        """
        cfg = self.cfg
        check_vision_inputs(pixel_values, grid_thw, cfg)
        m2 = cfg.spatial_merge_size ** 2
        order, window_lens = window_order(grid_thw.cpu(), cfg.spatial_merge_size, cfg.window_tokens)
        # A merged token's m^2 patches are consecutive in processor order and stay together: permute blocks.
        patch_order = (order[:, None] * m2 + torch.arange(m2)).flatten()  # (N,)
        hw = vision_positions(grid_thw.cpu(), cfg.spatial_merge_size)[patch_order]  # (N, 2) row, col
        x = self.patch_embed(pixel_values)[patch_order.to(pixel_values.device)]  # (N, C) in window order
        cos, sin = vision_cos_sin(hw.to(x.device), cfg.head_dim, cfg.rope_theta)  # (N, D)
        # Full-attention blocks: each frame of each image is one segment (the window order keeps frames whole).
        frame_lens = [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, frame_lens if i in cfg.fullatt_block_indexes else window_lens)
        tokens = self.merger(x)  # (N / m^2, out) in window order
        inverse = torch.argsort(order).to(tokens.device)  # window order -> processor order
        return tokens[inverse], []
