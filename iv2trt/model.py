"""The model a command names: the `model:` settings (variant, weights) and the PyTorch model they load, with errors
that name the variant or file and the fix."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .errors import PipelineError
from .fileio import shown_path
from .settings import given_settings, setting

log = logging.getLogger("iv2trt")


@dataclass
class ModelSettings:
    """The `model:` section: which variant and which weights."""

    variant: str = setting("internvideo2_clip_s14", "model variant: a name under configs/models/ or a YAML path")
    checkpoint: str | None = setting(None, "weights: full CLIP state dict or distilled backbone "
                                           "(.pth/.pt/.safetensors)")
    align_checkpoint: str | None = setting(None, "second file with the vision_align head, for backbone-only "
                                                 "checkpoints")
    random_init: bool = setting(False, "use random weights (no checkpoint); outputs are labelled RANDOM")
    seed: int = setting(0, "seed for --random-init weights")
    given: frozenset[str] = given_settings()  # the settings the user gave (flags, or their --config file)


def load_model(s: ModelSettings):
    """The PyTorch model named by the model settings (fp32, CPU, eval); PipelineError for bad settings. `variant`
    may also be a VisionConfig itself (on a Ray node, where the YAML files are not)."""
    from .models import VisionConfig, create_model

    if s.random_init and s.checkpoint:
        raise PipelineError(f"--random-init and --checkpoint {s.checkpoint} exclude each other (either may come from "
                            "the config file): drop --random-init (or pass --no-random-init) to use the checkpoint's "
                            "weights, or drop --checkpoint for random ones")
    cfg = s.variant if isinstance(s.variant, VisionConfig) else vision_config(s.variant)
    for path in (s.checkpoint, s.align_checkpoint):
        if path:
            check_checkpoint_file(path)
    return create_model(cfg, checkpoint=s.checkpoint, align_checkpoint=s.align_checkpoint,
                        random_init=s.random_init, seed=s.seed)


def resolve_variant(variant: str) -> str:
    """A variant name (`internvideo2_clip_s14`, or short `s14`) -> its YAML under configs/models/ (the
    repository's or the installed package's); a path is returned as it is. PipelineError for unknown names."""
    from .models import list_variants
    from .models.config import variant_path

    if Path(variant).suffix:
        return variant
    path = variant_path(variant)
    if path is None:
        raise PipelineError(f"unknown model variant {variant!r}: pass --variant with one of {list_variants()} or a "
                            "YAML path")
    return str(path)


def vision_config(variant: str):
    """The VisionConfig of --variant (a name or a YAML path); PipelineError naming the variant otherwise."""
    import yaml

    from .models import load_vision_config

    try:
        return load_vision_config(resolve_variant(variant))
    except (ValueError, OSError, TypeError, yaml.YAMLError) as exc:
        raise PipelineError(f"--variant {variant}: {exc}") from None


# first bytes of files people pass as --checkpoint by mistake
_NOT_CHECKPOINTS = ((4, b"ftyp", "an MP4/MOV video"), (0, b"RIFF", "an AVI/WAV file"),
                    (0, b"\x1aE\xdf\xa3", "a Matroska/WebM video"), (0, b"\xff\xd8", "a JPEG image"),
                    (0, b"\x89PNG", "a PNG image"), (0, b"\x93NUMPY", "a .npy array"))


def check_checkpoint_file(path: str) -> None:
    """PipelineError unless `path` starts like what read_state_dict reads: a PyTorch zip or pickle file, or (named
    .safetensors) a safetensors file."""
    p = Path(path)
    if not p.is_file():
        raise PipelineError(f"checkpoint {shown_path(p)} does not exist: check the path (or use --random-init "
                            "without --checkpoint)")
    with open(p, "rb") as f:
        head = f.read(16)
    if p.suffix == ".safetensors":
        ok = len(head) > 8 and head[8:9] == b"{"  # u64 header size, then the JSON header
    else:
        ok = head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"  # torch.save: zip, or legacy pickle
    if not ok:
        what = next((name for at, magic, name in _NOT_CHECKPOINTS if head[at:at + len(magic)] == magic),
                    f"a file starting with {head[:8]!r}")
        raise PipelineError(f"{path} is not a checkpoint but {what}: pass the model weights (.pth, .pt, .bin or "
                            ".safetensors) as --checkpoint")
