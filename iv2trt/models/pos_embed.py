"""Position embeddings: fixed 3-D sin-cos initialisation and resampling along time.

The trained `pos_embed` holds one cls row plus `num_frames x H x W` patch rows. Clips with
another frame count use it resampled in time the way upstream's `interpolate_pos_embed`
does (1-D linear, `align_corners=False`), except T = 1, which uses the temporal mean
(upstream's image path).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, dim] as [sin | cos] of positions x 1/10000^(2i/dim)."""
    freqs = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = positions.double()[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed_3d(dim: int, grid: int, frames: int) -> torch.Tensor:
    """[1 + frames*grid*grid, dim]: a zero cls row, then a quarter of the channels for time
    and three quarters for the (h, w) plane, the frame index varying slowest."""
    if dim % 4:
        raise ValueError("embed_dim must be a multiple of 4 for the 3-D sin-cos embedding")
    spatial_dim, temporal_dim = dim // 4 * 3, dim // 4
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    # upstream's meshgrid puts w first, so the first half encodes the column index
    spatial = torch.cat([_sincos_1d(spatial_dim // 2, cols.flatten()),
                         _sincos_1d(spatial_dim // 2, rows.flatten())], dim=1)
    temporal = _sincos_1d(temporal_dim, torch.arange(frames))
    table = torch.cat([temporal[:, None, :].expand(-1, grid * grid, -1),
                       spatial[None, :, :].expand(frames, -1, -1)], dim=-1)
    table = torch.cat([torch.zeros(1, dim, dtype=table.dtype), table.reshape(-1, dim)], dim=0)
    return table.float()


def interpolate_checkpoint_pos_embed(pos_embed: torch.Tensor, frames: int, patches_per_frame: int) -> torch.Tensor:
    """Resample a checkpoint's `[1, 1 + T0*L, C]` pos_embed to `frames` with F.interpolate (linear).

    This is the offline form used when a checkpoint was trained for another frame count.
    """
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    old_frames = patches.shape[1] // patches_per_frame
    series = patches.reshape(old_frames, patches_per_frame, dim).permute(1, 2, 0)  # [L, C, T0]
    series = F.interpolate(series.float(), size=frames, mode="linear", align_corners=False)
    patches = series.permute(2, 0, 1).reshape(1, frames * patches_per_frame, dim).to(pos_embed.dtype)
    return torch.cat([cls, patches], dim=1)


def pos_embed_for_frames(pos_embed: torch.Tensor, trained_frames: int, frame_index: torch.Tensor) -> torch.Tensor:
    """Position embedding for a clip, computed with tensor ops only so that it stays dynamic in ONNX.

    pos_embed: [1, 1 + trained_frames*L, C] (float32); frame_index: float32 `arange(T)` of the clip.
    Returns [1, 1 + T*L, C]. T = trained_frames gives pos_embed exactly (zero interpolation weight),
    T = 1 the temporal mean, any other T linear interpolation with align_corners=False.
    """
    dim = pos_embed.shape[-1]
    cls = pos_embed[:, :1]
    table = pos_embed[0, 1:].reshape(trained_frames, -1, dim)  # [T0, L, C]
    frames = torch.ones_like(frame_index).sum()
    src = ((frame_index + 0.5) * (trained_frames / frames) - 0.5).clamp(min=0.0)
    left = src.floor().clamp(max=trained_frames - 1)
    weight = (src - left)[:, None, None]
    left_idx = left.long()
    right_idx = (left_idx + 1).clamp(max=trained_frames - 1)
    resampled = table[left_idx] * (1.0 - weight) + table[right_idx] * weight  # [T, L, C]
    mean = table.mean(dim=0, keepdim=True)
    resampled = torch.where(frames == 1, mean, resampled)
    return torch.cat([cls, resampled.reshape(1, -1, dim)], dim=1)
