"""The extraction job's settings (the `model:` and `infer:` sections, every key a flag of trt_inference.py) and
their checks, shared by both executors."""
from __future__ import annotations

from dataclasses import dataclass

from ..decode.plan import (
    DECODERS,
    DEFAULT_NVDEC_SESSIONS,
    NVDEC_PIPELINES_PER_GPU,
    default_decode_threads,
    default_workers,
)
from ..errors import PipelineError
from ..model import ModelSettings
from ..runners.choice import BACKENDS
from ..settings import setting


@dataclass
class InferSettings(ModelSettings):
    variant: str = setting("internvideo2_clip_s14", "model variant: a name under configs/models/ or a YAML path; "
                           "with ONNX Runtime or TensorRT it must be the model file's, which is taken when this is "
                           "not given")
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
    decoder: str = setting("auto", "where videos are decoded: auto (the GPU's NVDEC engines and CPU workers pull from "
                           "one queue, the CPU workers leaving the job's tail to the GPU and taking what it cannot "
                           "decode; CPU only when NVDEC cannot run here), nvdec (the GPU takes every input it can, CPU "
                           "workers only the rest; exit 4 if NVDEC cannot run), cpu (PyAV worker processes)",
                           choices=DECODERS)
    gpus: str = setting("all", "GPUs the job runs on, --pipelines-per-gpu pipelines each (a pipeline: its NVDEC "
                        "sessions, its share of the CPU workers, its encoder): all, none (the CPU), a number N (the "
                        "first N), or indices such as 0,2 (an index twice: two pipelines on that GPU, whatever "
                        "--pipelines-per-gpu says; one index alone: '1,')")
    pipelines_per_gpu: int = setting(0, "pipelines (processes) per GPU, each with its own NVDEC sessions and CUDA "
                                     "context (one process's sessions kept an H200's video decoders about three "
                                     "quarters busy, two processes' nearly always) (0: "
                                     f"{NVDEC_PIPELINES_PER_GPU} where the GPU decodes with NVDEC, i.e. --decoder "
                                     "auto or nvdec with PyNvVideoCodec installed, unless the encoder runs on the CPU "
                                     "(ONNX Runtime without a GPU provider); else 1)")
    nvdec_sessions: int = setting(DEFAULT_NVDEC_SESSIONS, "NVDEC decoder sessions (threads) per pipeline")
    workers: int | None = setting(None, f"CPU decoding processes, shared by the pipelines (default: one per core, "
                                  f"{default_workers()} here; beside NVDEC half the cores, "
                                  f"{default_workers(nvdec=True)} here, which share NVDEC's videos under --decoder "
                                  "auto and take what it cannot)")
    gpu_convert: bool = setting(True, "CPU decode workers beside a GPU hand the decoded 4:2:0 frames (8/10/12-bit) "
                                "over, and the GPU converts and resizes them as it does NVDEC's (no: the workers "
                                "resize, as without a GPU)")
    shared_memory: bool = setting(True, "the frames CPU workers hand to the GPU (--gpu-convert) pass through shared "
                                  "memory (an anonymous memfd ring per worker, not /dev/shm) rather than the workers' "
                                  "pipes (no: the pipes)")
    decode_threads: int = setting(0, "FFmpeg threads each CPU decoding process decodes a video with (0: half a "
                                  "core per process, at least one: "
                                  f"{default_decode_threads(default_workers())} here with the default workers)")
    encoder_graphs: bool = setting(True, "where the GPU decodes in the job's process (no torch.compile there), the "
                                   "PyTorch encoder replays a CUDA graph of the full batch captured before decoding "
                                   "starts (no: the eager model launches every kernel)")
    nvdec_probe_processes: int | None = setting(None, "helper processes that read each video once with PyAV before "
                                                "NVDEC decodes it (its frame timestamps and keyframes), so that pass "
                                                "holds no lock the NVDEC sessions and the encoder share (default: one "
                                                "per two NVDEC sessions; 0: in the sessions' threads)")
    window_seconds: float | None = setting(None, "one clip per window of this many seconds (default: one clip "
                                           "per video)")
    window_frames: int | None = setting(None, "one clip per window of this many frames")
    stride: float | None = setting(None, "window step, in the window's unit (default: the window size)")
    frame_folders: bool = setting(True, "a folder holding only images is one video (frames in name order)")
    dtype: str = setting("float16", "feature file dtype", choices=("float16", "float32"))
    shard_size: int = setting(4096, "feature rows per shard (a shard holds whole videos)")
    commit_seconds: float = setting(60.0, "also commit a shard once its oldest finished input has waited this many "
                                    "seconds, so an interrupt or crash loses about this much work at most (the "
                                    "--ray job commits per partition instead)")
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
    ray_pipelines: int = setting(0, "--ray: pipeline actors, each the local job's pipeline (decoders, batcher, "
                                 "encoder) on a GPU (0: --pipelines-per-gpu per GPU in the cluster; one per node "
                                 "without GPUs)")
    ray_pipeline_cpus: float = setting(0.0, "--ray: CPUs reserved per pipeline actor, its decode workers among them "
                                       "(0: the fewest CPUs a node has per GPU, or per node without GPUs)")


def check_settings(s: InferSettings) -> None:
    """PipelineError naming each setting that cannot be used as given (both executors' settings: one check)."""
    bad = [f"--{name.replace('_', '-')} {getattr(s, name)!r}" for name in
           ("batch_size", "workers", "nvdec_sessions", "shard_size", "commit_seconds", "decode_timeout_s",
            "ray_partition_size")
           if getattr(s, name) is not None and not getattr(s, name) > 0]
    if bad:
        raise PipelineError(f"{', '.join(bad)}: must be positive")
    bad = [f"--{name.replace('_', '-')} {getattr(s, name)!r}" for name in ("window_seconds", "window_frames", "stride")
           if getattr(s, name) is not None and not getattr(s, name) > 0]
    if bad:
        raise PipelineError(f"{', '.join(bad)}: must be positive (without a window each video is one clip)")
    bad = [f"--{name.replace('_', '-')} {getattr(s, name)!r}" for name in ("ray_pipelines", "ray_pipeline_cpus")
           if getattr(s, name) < 0]
    if bad:
        raise PipelineError(f"{', '.join(bad)}: must be positive (or 0: chosen from the cluster)")
    if s.pipelines_per_gpu < 0:
        raise PipelineError(f"--pipelines-per-gpu {s.pipelines_per_gpu}: must be positive (or 0: "
                            f"{NVDEC_PIPELINES_PER_GPU} where the GPU decodes with NVDEC, else 1)")
    if s.nvdec_probe_processes is not None and s.nvdec_probe_processes < 0:
        raise PipelineError(f"--nvdec-probe-processes {s.nvdec_probe_processes}: must be positive (or 0: in the NVDEC "
                            "sessions' threads)")
    if s.decode_threads < 0:
        raise PipelineError(f"--decode-threads {s.decode_threads}: must be positive (or 0: chosen from the cores)")
    if s.stride is not None and s.window_seconds is None and s.window_frames is None:
        raise PipelineError(f"--stride {s.stride:g} needs a window to step: add --window-seconds or --window-frames "
                            "(without one, each video is one clip)")
