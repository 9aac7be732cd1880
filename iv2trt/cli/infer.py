"""`trt_inference.py`: the command of stage 3 (videos -> L2-normalised clip features): its help, the choice of
executor, and the --compare-pytorch check."""
from __future__ import annotations

import logging
from typing import Any, Sequence

from ..errors import EXIT_OK, EXIT_SOME_INPUTS_FAILED, Interrupted, PipelineError, ValidationFailed
from ..job.settings import InferSettings, check_settings
from ..settings import parse_settings

log = logging.getLogger(__name__)

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
  130  interrupted (committed shards are kept, and the job commits at least every --commit-seconds; rerun
       the same command to resume)

results: <output>/shards/*.npy (features) and *.parquet (which video, clip and window each row is), or
  videos/<id>.npy with --per-video-npy; read them with `from iv2trt import load_features`. Default paths
  (build/..., outputs/...) are relative to the working directory.

example: python trt_inference.py --inputs videos/ --output outputs/feats --backend onnxruntime --onnx build/x.onnx
on a Ray cluster (ray start --head, then ray start --address HEAD:6379 on the others; README):
         python trt_inference.py --ray auto --inputs /shared/videos/ --output outputs/feats"""


def check_comparison(summary: dict[str, Any], precision: str) -> None:
    from ..compare import Comparison

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
        from ..decode.samples import make_samples

        for path in make_samples(s.make_samples):
            print(path)
        return EXIT_OK
    from ..decode.clips import Windowing
    from ..decode.inputs import discover
    from ..output.results import manifest_stamps

    if not s.inputs:
        raise PipelineError("no inputs: pass --inputs DIR|GLOB|LIST|FILE ... (or set infer.inputs in the config)")
    check_settings(s)
    try:
        windowing = Windowing(s.frames, s.window_seconds, s.window_frames, s.stride)
    except ValueError as exc:
        raise PipelineError(str(exc)) from None
    items = discover(s.inputs, s.frame_folders)
    before = manifest_stamps(s.output)
    try:
        if s.ray is not None:
            from ..distributed.ray_job import run_ray_job

            summary = run_ray_job(s, items, windowing)
        else:
            from ..job.local import run_local_job

            summary = run_local_job(s, items, windowing)
    except KeyboardInterrupt:
        raise Interrupted(interrupted(s, before)) from None
    if s.compare_pytorch and summary["compare_pytorch"]["clips"]:
        check_comparison(summary, summary["precision"])
    return EXIT_SOME_INPUTS_FAILED if summary["failed"] else EXIT_OK


def interrupted(s: InferSettings, before: dict[str, int]) -> str:
    """What an interrupted job kept in its output directory (`before`: its manifest stamps when the job began),
    and how to go on."""
    from ..output.results import committed_since, output_totals

    totals = output_totals(s.output)
    if not totals["inputs"]:
        return f"interrupted: nothing is committed in {s.output} yet; rerun the same command to start again"
    again = ("rerun the same command without --overwrite to resume (with it, the job starts over)" if s.overwrite
             else "rerun the same command to resume")
    return (f"interrupted: {totals['inputs']} inputs ({totals['clips']} clips) are committed in {s.output} "
            f"({len(committed_since(s.output, before))} of them in this run); {again}")
