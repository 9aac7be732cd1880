"""Model shapes as data: one YAML per variant under configs/models/, read into VisionConfig."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml


def _model_config_dir() -> Path:
    """configs/models/: the copy `pip install .` puts inside iv2trt (iv2trt/configs/models), else the repository
    checkout's (the same rule as iv2trt.settings.config_dir)."""
    package = Path(__file__).resolve().parent.parent  # iv2trt/
    installed = package / "configs" / "models"
    return installed if installed.is_dir() else package.parent / "configs" / "models"


MODEL_CONFIG_DIR = _model_config_dir()


@dataclass(frozen=True)
class VisionConfig:
    """Hyper-parameters of an InternVideo2-CLIP vision tower (backbone + align head)."""

    name: str = "internvideo2_clip_s14"
    img_size: int = 224
    patch_size: int = 14
    tubelet_size: int = 1
    in_chans: int = 3
    num_frames: int = 8
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    qk_normalization: bool = True
    init_values: float = 0.1
    norm_eps: float = 1e-6
    attn_pool_num_heads: int = 16
    clip_embed_dim: int = 768
    align_dim: int = 512
    gelu_approximate: str = "none"

    def __post_init__(self):
        if self.tubelet_size != 1:
            raise ValueError("only tubelet_size 1 is supported (all released InternVideo2-CLIP models use it)")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads or self.embed_dim % self.attn_pool_num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} must divide by num_heads and attn_pool_num_heads")
        if self.gelu_approximate not in ("none", "tanh"):
            raise ValueError(f"gelu_approximate must be 'none' or 'tanh', got {self.gelu_approximate!r}")

    @property
    def grid_size(self) -> int:
        """Patches along one side of a frame (16 for 224 / 14)."""
        return self.img_size // self.patch_size

    @property
    def patches_per_frame(self) -> int:
        return self.grid_size**2

    def flops_per_clip(self, frames: int) -> float:
        """Multiply-add FLOPs (2 per MAC) of one clip of `frames` frames, counted from the shapes."""
        c, n = self.embed_dim, 1 + frames * self.patches_per_frame
        hidden = int(c * self.mlp_ratio)
        patch = frames * self.patches_per_frame * c * self.in_chans * self.patch_size**2
        block = n * (3 * c * c + c * c + 2 * c * hidden) + 2 * n * n * c
        pool = (2 * n + 1) * c * c + 2 * n * c + c * self.clip_embed_dim  # q projects the one pooled query
        align = self.clip_embed_dim * self.align_dim
        return 2.0 * (patch + self.depth * block + pool + align)


def list_variants() -> list[str]:
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.yaml"))


def variant_path(name: str) -> Path | None:
    """The YAML of a variant name (`internvideo2_clip_s14`, or short `s14`) under MODEL_CONFIG_DIR, or None."""
    name = name.lower()
    candidates = (MODEL_CONFIG_DIR / f"{name}.yaml", MODEL_CONFIG_DIR / f"internvideo2_clip_{name}.yaml")
    return next((p for p in candidates if p.exists()), None)


def load_vision_config(variant: str | Path) -> VisionConfig:
    """Read a variant by name (`internvideo2_clip_s14`, or short `s14`) or by YAML path."""
    path = Path(variant)
    if not path.suffix:
        path = variant_path(str(variant)) or MODEL_CONFIG_DIR / f"{str(variant).lower()}.yaml"
    if not path.exists():
        raise ValueError(f"unknown model variant {str(variant)!r}: choose one of {list_variants()} or give a YAML path")
    data = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in dataclasses.fields(VisionConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; known keys are {sorted(known)}")
    return VisionConfig(**data)
