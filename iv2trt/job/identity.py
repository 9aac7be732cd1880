"""What decides a job's features (job.json: resuming into an output directory requires all of it to match), and
the summary's closing fields; both executors call these."""
from __future__ import annotations

import logging
import os
from typing import Any

from ..errors import PipelineError
from ..fileio import sha256_file
from ..runners.choice import runner_precision, runner_random_init, runner_variant
from .settings import InferSettings

log = logging.getLogger(__name__)


def job_identity(s: InferSettings, runner, img_size: int) -> dict[str, Any]:
    """What decides the features: resuming into an output dir requires all of it to match."""
    backend, precision = runner.name, runner_precision(runner)
    if backend == "torch":
        model = {"checkpoint_sha256": sha256_file(s.checkpoint) if s.checkpoint else None,
                 "align_checkpoint_sha256": sha256_file(s.align_checkpoint) if s.align_checkpoint else None,
                 "random_init_seed": None if s.checkpoint else s.seed, "variant": s.variant,
                 "precision": precision}
    else:
        path = s.engine if backend == "tensorrt" else s.onnx
        model = {"model_file": os.path.basename(path), "model_sha256": sha256_file(path),
                 "variant": runner_variant(runner)}  # the model file's: complete_identity checks it
        if backend == "onnxruntime":
            model["converted_to_fp32"] = getattr(runner, "converted_from", None) is not None
    return {"backend": backend, **model, "random_init": runner_random_init(runner, s), "frames": s.frames,
            "img_size": img_size,
            "window_seconds": s.window_seconds, "window_frames": s.window_frames, "stride": s.stride,
            "frame_folders": s.frame_folders, "dtype": s.dtype, "per_video_npy": s.per_video_npy}


def complete_identity(identity: dict[str, Any], s: InferSettings) -> dict[str, Any]:
    """`identity` (job_identity's, computed where the runner is) with the model variant settled and the engine map
    added; warns about random weights. Both executors call it."""
    from ..engine.engine_map import engine_map_identity

    if identity["backend"] != "torch":  # the PyTorch model is built from --variant: nothing to disagree with
        identity["variant"] = settle_variant(identity["variant"], s, identity["model_file"])
    identity.update(engine_map_identity(s, identity["backend"]))
    if identity["random_init"]:
        log.warning("RANDOM WEIGHTS: the %s model was made with --random-init; its features mean nothing "
                    "(export a --checkpoint for real ones)", identity["backend"])
    return identity


def settle_variant(file_variant: str | None, s: InferSettings, model_file: str) -> str | None:
    """The variant of a job on a model file made for `file_variant` (None: the file does not say): --variant when
    the user gave it (flag or config file; PipelineError when it is unknown or disagrees with the file's), else
    the file's."""
    from ..model import vision_config

    if "variant" not in s.given:
        if file_variant is None:
            log.warning("%s does not say which model variant it holds: pass --variant to record one", model_file)
        elif file_variant != s.variant:
            log.info("model variant %s, the model file's (no --variant given)", file_variant)
        return file_variant
    name = vision_config(s.variant).name
    if file_variant is not None and name != file_variant:
        raise PipelineError(f"--variant {s.variant} disagrees with {model_file}, made for {file_variant}: pass "
                            f"--variant {file_variant}, the model file's, or export (and build) one for {name} "
                            f"(export_onnx.py --variant {s.variant})")
    return name


def finish_summary(out_dir: str, summary: dict[str, Any], random_init: bool | None) -> None:
    """Add to summary.json what run_job cannot know: whether the weights are random, and the output's totals over
    every run into it (a resumed run's own counts leave out what earlier runs extracted)."""
    from ..output.results import output_totals
    from ..output.writer import write_summary

    summary["random_init"] = random_init
    summary["output_totals"] = totals = output_totals(out_dir)
    write_summary(out_dir, summary)
    log.info("%s holds %d inputs (%d clips) in %d shards over all runs%s", out_dir, totals["inputs"], totals["clips"],
             totals["shards"], "; RANDOM weights: these features mean nothing" if random_init else "")
