"""`trt_inference.py`: settings and orchestration of stage 3 (videos -> L2-normalised clip features)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .backends import BACKENDS, create_runner, runner_img_size, runner_precision, runner_random_init
from .cli import ModelSettings
from .errors import EXIT_OK, EXIT_SOME_INPUTS_FAILED, PipelineError, ValidationFailed
from .fileio import sha256_file
from .decoders import DECODERS, DEFAULT_NVDEC_SESSIONS, check_decoder, default_workers
from .settings import parse_settings, setting

log = logging.getLogger(__name__)


@dataclass
class InferSettings(ModelSettings):
    inputs: list[str] = setting([], "directories (recursive), globs, list files (.txt; .csv/.jsonl with path[,id]), "
                                "video/image files, folders of frames, or .npy preprocessed frames [B,T,3,H,W]")
    output: str = setting("outputs/features", "output directory (shards, manifests, failures.jsonl, summary.json)")
    backend: str = setting("auto", "tensorrt | onnxruntime | torch | auto (TensorRT when it can run: installed, "
                           "with pycuda, a GPU and the engine file; else PyTorch fp16 on a CUDA GPU when "
                           "--checkpoint or --random-init gives weights; else onnxruntime)", choices=BACKENDS)
    engine: str = setting("build/internvideo2_clip_s14_fp16.engine", "TensorRT engine (backend tensorrt/auto)")
    onnx: str = setting("build/internvideo2_clip_s14_fp16.onnx", "ONNX file (backend onnxruntime/auto)")
    frames: int = setting(8, "frames per clip (T), sampled as upstream: middle frame of T equal segments")
    batch_size: int = setting(32, "clips per inference call (capped by the engine's/graph's max batch)")
    decoder: str = setting("auto", "where videos are decoded: auto (the GPU's NVDEC engines and the CPU workers "
                           "together, pulling from one queue; CPU only when NVDEC cannot run here), nvdec (the GPU "
                           "takes every input it can; exit 4 if it cannot run), cpu (PyAV worker processes)",
                           choices=DECODERS)
    nvdec_sessions: int = setting(DEFAULT_NVDEC_SESSIONS, "NVDEC decoder sessions (threads) on the GPU")
    workers: int | None = setting(None, f"CPU decoding processes (default: one per core, {default_workers()} here; "
                                  f"a quarter of the cores, {default_workers(nvdec=True)} here, beside NVDEC)")
    window_seconds: float | None = setting(None, "one clip per window of this many seconds (default: one clip "
                                           "per video)")
    window_frames: int | None = setting(None, "one clip per window of this many frames")
    stride: float | None = setting(None, "window step, in the window's unit (default: the window size)")
    frame_folders: bool = setting(True, "a folder holding only images is one video (frames in name order)")
    dtype: str = setting("float16", "feature file dtype", choices=("float16", "float32"))
    shard_size: int = setting(4096, "feature rows per shard (a shard holds whole videos)")
    per_video_npy: bool = setting(False, "one videos/<id>.npy per input instead of shards of features")
    decode_timeout_s: float = setting(120.0, "an input whose decoder makes no progress this long is failed")
    overwrite: bool = setting(False, "delete the features already in --output instead of resuming")
    compare_pytorch: str | None = setting(None, "also run the PyTorch fp32 model (a checkpoint path, or 'random' "
                                          "for --random-init weights) and check agreement (exit 3 if off)")
    progress: bool = setting(True, "progress bar")
    make_samples: str | None = setting(None, "write a few small sample videos into this folder and exit")
    # engines per GPU model, and the Ray executor (iv2trt/engine_map.py, iv2trt/ray_job.py)
    engines: list[str] = setting([], "one TensorRT engine per GPU model, as GPU_MODEL=PATH (e.g. "
                                 "H100=build/s14_h100.engine): a GPU whose name contains GPU_MODEL uses PATH, "
                                 "others --engine")
    ray: str | None = setting(None, "run the job on Ray (pip install -r requirements-distributed.txt): --ray alone "
                              "starts Ray on this machine; --ray auto joins the cluster of `ray start`; --ray "
                              "HOST:PORT another (see README)", const="local")
    ray_partition_size: int = setting(512, "--ray: inputs per partition, the unit of resume: one shard each, "
                                      "committed once all its inputs finished (replaces --shard-size)")
    ray_encoders: int = setting(0, "--ray: encoder actors (0: one per GPU in the cluster; one CPU actor without GPUs)")
    ray_encoder_cpus: float = setting(1.0, "--ray: CPUs reserved per encoder actor")
    ray_decode_cpus: float = setting(1.0, "--ray: CPUs per decode task (as many tasks run as CPUs are free)")


DESCRIPTION = """Stage 3: extract L2-normalised InternVideo2-CLIP features from videos, images and frame folders.

Decodes on the GPU's video engines (NVDEC) and in CPU worker processes (PyAV) at once, samples T frames
per clip as upstream does (same pixels on both paths), batches clips across videos for the backend and
writes sharded .npy features with a Parquet manifest per shard.
Rerunning with the same --output resumes: finished inputs are skipped (a killed run loses nothing
committed and duplicates nothing); a different model or settings there is refused."""

EPILOG = """exit codes:
  0    every input extracted
  2    bad settings or input paths (the message says which)
  3    --compare-pytorch: the backend disagrees with PyTorch beyond tolerance
  4    the backend asked for cannot run here (TensorRT, pycuda or a GPU missing, a driver too old for the
       TensorRT wheel; --decoder nvdec without NVDEC; Ray missing for --ray); --backend auto falls back to
       PyTorch on a GPU (with weights) or onnxruntime instead
  5    the engine was built for another GPU or TensorRT version (the message gives the rebuild command)
  6    some inputs failed (unreadable, truncated, timed out); they are listed in <output>/failures.jsonl
  130  interrupted (committed shards are kept; rerun the same command to resume)

results: <output>/shards/*.npy (features) and *.parquet (which video, clip and window each row is), or
  videos/<id>.npy with --per-video-npy; read them with `from iv2trt import load_features`. Default paths
  (build/..., outputs/...) are relative to the working directory.

example: python trt_inference.py --inputs videos/ --output outputs/feats --backend onnxruntime --onnx build/x.onnx
on a Ray cluster (ray start --head, then ray start --address HEAD:6379 on the others; README):
         python trt_inference.py --ray auto --inputs /shared/videos/ --output outputs/feats"""


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
        model = {"model_file": os.path.basename(path), "model_sha256": sha256_file(path)}
        if backend == "onnxruntime":
            model["converted_to_fp32"] = getattr(runner, "converted_from", None) is not None
    return {"backend": backend, **model, "random_init": runner_random_init(runner, s), "frames": s.frames,
            "img_size": img_size,
            "window_seconds": s.window_seconds, "window_frames": s.window_frames, "stride": s.stride,
            "frame_folders": s.frame_folders, "dtype": s.dtype, "per_video_npy": s.per_video_npy}


def complete_identity(identity: dict[str, Any], s: InferSettings) -> dict[str, Any]:
    """`identity` (job_identity's, computed where the runner is) with the engine map added; warns about random
    weights. Both executors call it."""
    from .engine_map import engine_map_identity

    identity.update(engine_map_identity(s, identity["backend"]))
    if identity["random_init"]:
        log.warning("RANDOM WEIGHTS: the %s model was made with --random-init; its features mean nothing "
                    "(export a --checkpoint for real ones)", identity["backend"])
    return identity


def check_settings(s: InferSettings) -> None:
    """PipelineError naming each setting that cannot be used as given."""
    bad = [f"--{name.replace('_', '-')} {getattr(s, name)!r}" for name in
           ("batch_size", "workers", "nvdec_sessions", "shard_size", "decode_timeout_s")
           if getattr(s, name) is not None and not getattr(s, name) > 0]
    if bad:
        raise PipelineError(f"{', '.join(bad)}: must be positive")
    if s.stride is not None and s.window_seconds is None and s.window_frames is None:
        raise PipelineError(f"--stride {s.stride:g} needs a window to step: add --window-seconds or --window-frames "
                            "(without one, each video is one clip)")


def finish_summary(out_dir: str, summary: dict[str, Any], random_init: bool | None) -> None:
    """Add to summary.json what run_job cannot know: whether the weights are random, and the output's totals over
    every run into it (a resumed run's own counts leave out what earlier runs extracted)."""
    from .results import output_totals
    from .writer import write_summary

    summary["random_init"] = random_init
    summary["output_totals"] = totals = output_totals(out_dir)
    write_summary(out_dir, summary)
    log.info("%s holds %d inputs (%d clips) in %d shards over all runs%s", out_dir, totals["inputs"], totals["clips"],
             totals["shards"], "; RANDOM weights: these features mean nothing" if random_init else "")


def reference_runner(s: InferSettings):
    """The PyTorch fp32 model that --compare-pytorch checks the backend against."""
    from .cli import load_model
    from .runners import TorchRunner

    if s.compare_pytorch == "random":
        ref = ModelSettings(variant=s.variant, random_init=True, seed=s.seed)
    else:
        if not Path(s.compare_pytorch).is_file():
            raise PipelineError(f"--compare-pytorch {s.compare_pytorch}: no such checkpoint (or pass 'random')")
        ref = ModelSettings(variant=s.variant, checkpoint=s.compare_pytorch, align_checkpoint=s.align_checkpoint)
    return TorchRunner(load_model(ref), precision="fp32")


def check_comparison(summary: dict[str, Any], precision: str) -> None:
    from .compare import Comparison

    c = summary["compare_pytorch"]
    line = (f"compare with PyTorch fp32 ({precision} backend, {c['clips']} clips): min cosine {c['min_cosine']:.6f}, "
            f"max abs error {c['max_abs_error']:.3e}, max rel error {c['max_rel_error']:.3e}")
    print(line, flush=True)
    if not Comparison(c["max_abs_error"], c["max_rel_error"], c["min_cosine"]).passes(precision):
        raise ValidationFailed(f"{line}: outside {Comparison.threshold(precision)}; features were written but do not "
                               "match the PyTorch model (wrong checkpoint for this engine/graph, or a broken build)")


def main(argv: Sequence[str] | None = None) -> int:
    s = parse_settings(InferSettings, ("model", "infer"), DESCRIPTION, argv, epilog=EPILOG)
    if s.make_samples:
        from .samples import make_samples

        for path in make_samples(s.make_samples):
            print(path)
        return EXIT_OK
    from .inputs import discover
    from .job import JobOptions, check_frame_count, run_job
    from .video import Windowing
    from .writer import FeatureWriter, prepare_output

    if not s.inputs:
        raise PipelineError("no inputs: pass --inputs DIR|GLOB|LIST|FILE ... (or set infer.inputs in the config)")
    check_settings(s)
    try:
        windowing = Windowing(s.frames, s.window_seconds, s.window_frames, s.stride)
    except ValueError as exc:
        raise PipelineError(str(exc)) from None
    items = discover(s.inputs, s.frame_folders)
    if s.ray is not None:
        from .ray_job import run_ray_job

        summary = run_ray_job(s, items, windowing)
        return EXIT_SOME_INPUTS_FAILED if summary["failed"] else EXIT_OK
    check_decoder(s.decoder)
    from .engine_map import settings_for_this_gpu

    runner = create_runner(settings_for_this_gpu(s))
    try:
        img_size = runner_img_size(runner)
        check_frame_count(runner, s.frames)
        identity = complete_identity(job_identity(s, runner, img_size), s)
        done = prepare_output(s.output, identity, s.overwrite)
        todo = [item for item in items if item.id not in done]
        log.info("%d inputs found, %d to do, %d already done in %s", len(items), len(todo), len(items) - len(todo),
                 s.output)
        reference = reference_runner(s) if s.compare_pytorch else None
        writer = FeatureWriter(s.output, s.dtype, s.shard_size, s.per_video_npy)
        options = JobOptions(windowing, img_size, s.batch_size, s.workers, s.decode_timeout_s, s.progress,
                             s.decoder, s.nvdec_sessions)
        summary = run_job(todo, runner, s.output, writer, options, reference, skipped=len(items) - len(todo))
    finally:
        close = getattr(runner, "close", None)  # the TensorRT runner frees its engine and GPU buffers
        if close is not None:
            close()
    finish_summary(s.output, summary, identity["random_init"])
    if reference is not None and summary["compare_pytorch"]["clips"]:
        check_comparison(summary, runner_precision(runner))
    return EXIT_SOME_INPUTS_FAILED if summary["failed"] else EXIT_OK
