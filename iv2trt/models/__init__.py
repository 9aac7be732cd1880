"""InternVideo2-CLIP vision tower: configs, architecture, checkpoint loading, factory."""
from .checkpoint import CheckpointError, load_vision_checkpoint, read_state_dict
from .config import VisionConfig, list_variants, load_vision_config
from .factory import create_model
from .internvideo2_clip import InternVideo2CLIPVision

__all__ = ["CheckpointError", "InternVideo2CLIPVision", "VisionConfig", "create_model", "list_variants",
           "load_vision_checkpoint", "load_vision_config", "read_state_dict"]
