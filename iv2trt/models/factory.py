"""A small factory: variant name + weights -> a ready InternVideo2CLIPVision in eval mode."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_vision_checkpoint
from .config import VisionConfig, load_vision_config
from .internvideo2_clip import InternVideo2CLIPVision

log = logging.getLogger(__name__)


def create_model(variant: str | Path | VisionConfig = "internvideo2_clip_s14", checkpoint: str | Path | None = None,
                 align_checkpoint: str | Path | None = None, random_init: bool = False, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> InternVideo2CLIPVision:
    """Build the vision tower of `variant` and load `checkpoint` (or random weights when asked)."""
    cfg = variant if isinstance(variant, VisionConfig) else load_vision_config(variant)
    model = InternVideo2CLIPVision(cfg)
    if checkpoint:
        load_vision_checkpoint(model, checkpoint, align_checkpoint)
    elif random_init:
        log.warning("RANDOM WEIGHTS (seed %d): %s is not a trained model; its features mean nothing", seed, cfg.name)
        model.init_random_weights(seed)
    else:
        raise CheckpointError("no checkpoint given: pass --checkpoint PATH, or --random-init to try the pipeline "
                              "with random weights")
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
