"""Rotary position embeddings: M-RoPE for the decoder (Qwen3-VL's interleaved layout and Qwen2.5-VL's
contiguous one), the 2-D rotary of the vision towers, and `rope_index`, the 3-D (t, h, w) position ids of a
token sequence with images (the same for both architectures).

M-RoPE (Qwen2-VL paper, section 2.1): every token gets three position ids. Text tokens use the same value
on all three axes; an image's tokens get (t, h, w) grid coordinates offset by the position where the
image starts, and the text after the image resumes at start + max(h, w). Qwen2-VL / Qwen2.5-VL give each
axis a contiguous block of frequency pairs (t t .. h h .. w w ..); Qwen3-VL interleaves them (t h w t h w ... t t).
"""
import torch


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., D) by angles whose cos / signed_sin broadcast against it (from the *_cos_sin functions below).

    The 'half-split' rotary: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) over the two halves of the last dim.
    With signed_sin = sin with its first half negated, that is x * cos + (x2, x1) * signed_sin: three tensor ops
    (a flip of the halves, a product, an addcmul), product for product what HF's x * cos + rotate_half(x) * sin
    computes."""
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # (x2, x1)
    return torch.addcmul(x * cos, swapped, signed_sin)


def _cos_signed_sin(half_angles: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., D/2) angles -> cos, signed_sin (..., D): each angle rotates one pair (i, i + D/2)."""
    cos, sin = half_angles.cos(), half_angles.sin()
    return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def text_cos_sin(positions: torch.Tensor, freq: torch.Tensor, dtype: torch.dtype):
    """cos, signed_sin (B, D) of text tokens at positions (B,); freq = inv_freq(head_dim, theta) on their device.
    A text token has the same id on the three M-RoPE axes, so the axis layout does not matter: the same angles,
    bit for bit, as mrope_cos_sin. The rollout engine's step uses it (no per-step host tables)."""
    return _cos_signed_sin(positions[:, None].float() * freq, dtype)


def inv_freq(dim: int, theta: float) -> torch.Tensor:
    """Rotary inverse frequencies (dim // 2,), fp32, computed on the CPU so every device gets the same bits."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def mrope_axes(mrope_section, interleaved: bool) -> torch.Tensor:
    """Which position axis (0 = t, 1 = h, 2 = w) each rotary frequency pair takes its angle from, (D/2,) long.

    Contiguous (Qwen2.5-VL): mrope_section[0] pairs of t, then mrope_section[1] of h, then mrope_section[2] of w.
    Interleaved (Qwen3-VL): pair i takes axis i mod 3 for the first 3 * mrope_section[1|2] pairs; the rest are t.
    """
    n = sum(mrope_section)
    if not interleaved:
        return torch.repeat_interleave(torch.arange(3), torch.tensor(mrope_section))
    axes = torch.zeros(n, dtype=torch.long)  # start from t everywhere
    for axis in (1, 2):  # h takes pairs 1, 4, 7, ...; w takes 2, 5, 8, ...
        axes[axis:3 * mrope_section[axis]:3] = axis
    return axes


def mrope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, mrope_section,
                  dtype: torch.dtype, interleaved: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE angles: position_ids (3, B, T) -> cos, signed_sin (B, T, head_dim) in `dtype` for apply_rotary;
    each frequency pair rotates by the position on the axis `mrope_axes` gives it."""
    freq = inv_freq(head_dim, theta).to(position_ids.device)
    angles = position_ids[..., None].float() * freq  # (3, B, T, D/2)
    axes = mrope_axes(mrope_section, interleaved).to(position_ids.device)
    mixed = angles.gather(0, axes.expand(1, *angles.shape[1:]))[0]  # (B, T, D/2): pair i from axis axes[i]
    return _cos_signed_sin(mixed, dtype)


def vision_cos_sin(hw_positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D rotary angles of the vision tower, fp32.

    hw_positions (N, 2) = (row, col) of each patch -> cos, signed_sin (N, head_dim) for apply_rotary. A quarter
    of the head dim rotates with the row, a quarter with the col; the half-split layout doubles that to the full dim.
    """
    freq = inv_freq(head_dim // 2, theta).to(hw_positions.device)  # (D/4,)
    angles = hw_positions[..., None].float() * freq  # (N, 2, D/4)
    return _cos_signed_sin(angles.flatten(1), torch.float32)  # (N, D/2): [row angles | col angles]


def vision_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(row, col) of every patch, in the processor's patch order, (N, 2) long.

    The processor emits patches grouped by merge block: (block_row, block_col, row_in_block, col_in_block),
    so that `merge * merge` consecutive patches form one LLM token. Frames repeat the same grid.
    """
    out = []
    for t, h, w in grid_thw.tolist():
        rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
        cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
        # (bh, mh, bw, mw) -> (bh, bw, mh, mw): block-major order
        rows = rows.permute(0, 2, 1, 3).flatten()
        cols = cols.permute(0, 2, 1, 3).flatten()
        out.append(torch.stack((rows, cols), dim=-1).repeat(t, 1))
    return torch.cat(out).to(grid_thw.device)


def rope_index(input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None, attention_mask: torch.Tensor | None,
               image_token_id: int, spatial_merge_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D position ids of a batch, equal to transformers' get_rope_index of Qwen3-VL and Qwen2.5-VL for images
    (Qwen2.5-VL's second_per_grid_ts only spaces out video frames).

    input_ids (B, T); image_grid_thw (n_images, 3) in the order images appear (row by row); attention_mask
    (B, T) with 1 = real token (any padding layout). Padding slots are skipped: they get position 0 and
    the real tokens are numbered as if the padding were absent.
    Returns position_ids (3, B, T) long and rope_deltas (B, 1) = max position + 1 - number of real tokens,
    i.e. how far an image prompt shifts the positions of the text that follows it.
    """
    B, T = input_ids.shape
    device = input_ids.device
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if image_grid_thw is None:
        # Text only: consecutive positions over the real tokens, identical on the three axes.
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0).masked_fill(~mask, 0)
        return pos.unsqueeze(0).expand(3, B, T).clone(), torch.zeros(B, 1, dtype=torch.long, device=device)

    grids = image_grid_thw.tolist()
    next_grid = 0
    position_ids = torch.zeros(3, B, T, dtype=torch.long, device=device)
    deltas = []
    for b in range(B):
        ids = input_ids[b][mask[b]].cpu()
        image_at = (ids == image_token_id).nonzero().flatten().tolist()  # indices of the image tokens
        pieces = []
        cur, i, k = 0, 0, 0  # cur: next free position; i: next real token; k: next entry of image_at
        while k < len(image_at):
            start = image_at[k]
            pieces.append(torch.arange(cur, cur + start - i).expand(3, -1))  # text before the image
            cur += start - i
            # One image: its tokens form a (t, h, w) grid of merged patches starting at position `cur`.
            if next_grid >= len(grids):
                raise ValueError(f"row {b}: more images in input_ids than image_grid_thw entries ({len(grids)})")
            t, h, w = grids[next_grid]
            h, w = h // spatial_merge_size, w // spatial_merge_size
            n = t * h * w
            if k + n > len(image_at) or image_at[k + n - 1] != start + n - 1:
                raise ValueError(f"row {b}: image {next_grid} with grid {grids[next_grid]} needs {n} "
                                 f"consecutive image tokens from real token {start}")
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
            pieces.append(torch.stack((tt.flatten(), hh.flatten(), ww.flatten())) + cur)
            cur += max(h, w)  # text after the image resumes past its larger side
            i, k, next_grid = start + n, k + n, next_grid + 1
        pieces.append(torch.arange(cur, cur + len(ids) - i).expand(3, -1))  # trailing text
        row = torch.cat(pieces, dim=1)
        position_ids[:, b, mask[b]] = row.to(device)
        deltas.append(int(row.max()) + 1 - len(ids) if len(ids) else 0)
    if next_grid != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} entries but input_ids hold {next_grid} images")
    return position_ids, torch.tensor(deltas, device=device).unsqueeze(1)
