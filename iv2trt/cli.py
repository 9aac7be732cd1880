"""What the three stage scripts share: model settings and turning errors into exit codes."""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from .errors import EXIT_INTERNAL, EXIT_INTERRUPTED, PipelineError
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
    """The PyTorch model named by the model settings (fp32, CPU, eval)."""
    from models import create_model

    return create_model(s.variant, checkpoint=s.checkpoint, align_checkpoint=s.align_checkpoint,
                        random_init=s.random_init and not s.checkpoint, seed=s.seed)


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
    sys.exit(run_main(main))
