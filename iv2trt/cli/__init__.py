"""The commands: the three stage scripts' settings and `main`s (export, build, infer) and their console entry
points. Errors users can act on become one log line and their exit code here, and nowhere below; no module of
the package imports this one."""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Sequence

from ..errors import EXIT_INTERNAL, EXIT_INTERRUPTED, PipelineError

log = logging.getLogger(__name__)


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Call a stage's main; errors users can act on become one log line and their exit code."""
    try:
        return main(argv)
    except PipelineError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt as exc:  # errors.Interrupted says what was kept
        log.error("%s", str(exc) or "interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:
        from ..models import CheckpointError

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
    compiling = sys.modules.get("iv2trt.runners.compile")
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
    from .export import main

    exit_with(main)


def build_main() -> None:
    """Console script iv2trt-build: stage 2, as build_engine.py."""
    from .build import main

    exit_with(main)


def infer_main() -> None:
    """Console script iv2trt-infer: stage 3, as trt_inference.py."""
    from .infer import main

    exit_with(main)
