"""What the model sees: uint8 RGB frames -> normalised float [T, 3, 224, 224].

Upstream's test transform: resize to (224, 224) bicubic with antialias (torchvision on tensors),
divide by 255, normalise with ImageNet mean/std. The aspect ratio is not kept.

Two steps, so the job can move uint8 between processes and to the GPU (4x fewer bytes than float32):
`resize_frames` (decoder side: uint8 -> uint8, rounded and clamped as torchvision does) and
`normalize_frames` (inference side: uint8 -> float, on the CPU or on the runner's device).
`preprocess_frames` = `normalize_frames(resize_frames(...))`, bit-identical to doing both at once:
the resized values are whole uint8 levels before the float conversion either way.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_CPU_CHUNK_ELEMENTS = 1 << 21  # normalise on the CPU a few MB at a time (cache-sized temporaries)


def resize_planar(x: torch.Tensor, size: int) -> torch.Tensor:
    """float [N, 3, H, W] holding whole uint8 levels (any device) -> uint8 [N, size, size, 3]: bicubic,
    antialiased, rounded and clamped as torchvision does for uint8 images. The GPU decoder's frames come in
    here straight from the colour conversion; the CPU path's through `resize_frames`."""
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        x = x.round_().clamp_(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1)


def _resize_tensor(frames: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    x = torch.as_tensor(frames)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected frames shaped [T, H, W, 3], got {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 frames, got {x.dtype}")
    if x.shape[1:3] == (size, size):
        return x
    return resize_planar(x.permute(0, 3, 1, 2).float(), size)


def resize_frames(frames: np.ndarray | torch.Tensor, size: int = 224) -> np.ndarray:
    """uint8 frames [T, H, W, 3] (RGB) -> uint8 [T, size, size, 3] (bicubic, antialiased, rounded, clamped)."""
    return np.ascontiguousarray(_resize_tensor(frames, size).numpy())


_MEAN_STD: dict = {}


def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean/std as [1, 3, 1, 1] float32 on `device`, made once per device (a fresh host-to-GPU copy
    per batch would wait for the GPU's queued work and break the overlap of upload and compute)."""
    key = str(device)
    if key not in _MEAN_STD:
        _MEAN_STD[key] = (torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
                          torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1))
    return _MEAN_STD[key]


def normalize_frames(frames: np.ndarray | torch.Tensor, out: np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [..., H, W, 3] (numpy or torch, any device) -> float32 [..., 3, H, W]: /255, ImageNet mean/std.

    With `out` (numpy or torch, contiguous, [..., 3, H, W], float32/float16/bfloat16) the result is written
    there, computed in float32 and rounded once to out's dtype (as float32 frames cast afterwards would be);
    returns out as a tensor. On the CPU the work goes a few frames at a time (small temporaries)."""
    x = torch.as_tensor(frames)
    if x.ndim < 3 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 frames shaped [..., H, W, 3], got {x.dtype} {tuple(x.shape)}")
    shape = (*x.shape[:-3], 3, *x.shape[-3:-1])
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=x.device)
    else:
        out = torch.as_tensor(out)
        if tuple(out.shape) != shape or not out.is_contiguous() or not out.is_floating_point():
            raise ValueError(f"out must be a contiguous float array shaped {shape}, got {out.dtype} "
                             f"{tuple(out.shape)}")
    src = x.reshape(-1, *x.shape[-3:])                  # [N, H, W, 3]
    dst = out.view(-1, *shape[-3:])                    # [N, 3, H, W]
    mean, std = _mean_std(x.device)
    per_frame = max(1, src[0].numel())
    step = len(src) if x.device.type != "cpu" else max(1, _CPU_CHUNK_ELEMENTS // per_frame)
    tmp = None
    for a in range(0, len(src), step):
        b = min(a + step, len(src))
        if dst.dtype == torch.float32:
            work = dst[a:b]
        else:
            if tmp is None:
                tmp = torch.empty((min(step, len(src)), *dst.shape[1:]), dtype=torch.float32, device=x.device)
            work = tmp[:b - a]
        work.copy_(src[a:b].permute(0, 3, 1, 2))
        # the same element-wise operations as (x / 255.0 - mean) / std: identical results
        work.div_(255.0).sub_(mean).div_(std)
        if work.data_ptr() != dst[a:b].data_ptr():
            dst[a:b].copy_(work)
    return out


def preprocess_frames(frames: np.ndarray | torch.Tensor, size: int = 224) -> torch.Tensor:
    """uint8 frames [T, H, W, 3] (RGB) -> float32 [T, 3, size, size]."""
    return normalize_frames(_resize_tensor(frames, size))
