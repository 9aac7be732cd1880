"""What the three stage scripts share: model settings and turning errors into exit codes."""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .errors import EXIT_INTERNAL, EXIT_INTERRUPTED, PipelineError
from .fileio import shown_path
from .settings import setting

log = logging.getLogger("iv2trt")


@dataclass
class ModelSettings:
    """The `model:` section: which variant and which weights."""

    variant: str = setting("internvideo2_clip_s14", "model variant: a name under configs/models/ or a YAML path")
    checkpoint: str | None = setting(None, "weights: full CLIP state dict or distilled backbone (.pth/.pt/.safetensors)")
    align_checkpoint: str | None = setting(None, "second file with the vision_align head, for backbone-only checkpoints")
    random_init: bool = setting(False, "use random weights (no checkpoint); outputs are labelled RANDOM")
    seed: int = setting(0, "seed for --random-init weights")


def load_model(s: ModelSettings):
    """The PyTorch model named by the model settings (fp32, CPU, eval); PipelineError for bad settings. `variant`
    may also be a VisionConfig itself (on a Ray node, where the YAML files are not)."""
    from models import VisionConfig, create_model

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
    from models import list_variants
    from models.config import variant_path

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

    from models import load_vision_config

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


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Call a stage's main; errors users can act on become one log line and their exit code."""
    try:
        return main(argv)
    except PipelineError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        log.error("interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:
        from models import CheckpointError

        if isinstance(exc, CheckpointError):
            log.error("%s", exc)
            return PipelineError.exit_code
        log.exception("internal error: %s", exc)
        return EXIT_INTERNAL


def exit_with(main: Callable[[Sequence[str] | None], int]) -> None:
    """Run a stage's main as a program. After an interrupt, or once torch.compile has run in this process,
    leave without the interpreter's shutdown: a thread of the job may still be inside ONNX Runtime, TensorRT
    or TorchInductor, and shutting down under it aborts the process ("terminate called without an active
    exception", exit 134); and TorchInductor's exit hook waits for its compile worker processes (seconds
    after a short job). Committed results are on disk already (written atomically, fsynced); the log is
    flushed. An unfinished compile is dropped: the next run that needs its shape compiles it again."""
    code = run_main(main)
    compiling = sys.modules.get("iv2trt.torch_compile")
    unfinished = compiling.compiles_in_flight() if compiling else []
    if unfinished:
        log.info("leaving with the background torch.compile of %s unfinished (dropped; compiled again when "
                 "needed)", ", ".join(unfinished))
    if code == EXIT_INTERRUPTED or (compiling and compiling.compiled_here()):  # unfinished implies compiled_here
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def export_main() -> None:
    """Console script iv2trt-export: stage 1, as export_onnx.py."""
    from .export_cmd import main

    exit_with(main)


def build_main() -> None:
    """Console script iv2trt-build: stage 2, as build_engine.py."""
    from .build_cmd import main

    exit_with(main)


def infer_main() -> None:
    """Console script iv2trt-infer: stage 3, as trt_inference.py."""
    from .infer_cmd import main

    exit_with(main)
