"""What the model sees: uint8 RGB frames -> normalised float [T, 3, 224, 224].

Upstream's test transform: resize to (224, 224) bicubic with antialias (torchvision on tensors),
divide by 255, normalise with ImageNet mean/std. The aspect ratio is not kept.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess_frames(frames: np.ndarray | torch.Tensor, size: int = 224) -> torch.Tensor:
    """uint8 frames [T, H, W, 3] (RGB) -> float32 [T, 3, size, size]."""
    x = torch.as_tensor(frames)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected frames shaped [T, H, W, 3], got {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        # torchvision rounds and clamps resized uint8 images before the float conversion
        x = x.round_().clamp_(0, 255)
    x = x / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std
