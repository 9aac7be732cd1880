"""Pipeline benchmark: decode ceilings per path, the extraction job end to end per decoder, the encoder alone,
and the job's own overhead, all on the same videos in one run.

1. CPU decode scaling: every video decoded and sampled as the CPU workers do (decode.pyav.read_clips), then
   resized to uint8 (transforms.resize_frames), timed apart, in 1 process and in W processes.
2. decode ceilings: the real job (decoder workers, scheduling, batching, writing) with an encoder that costs
   nothing (`NullRunner`), for --decoder cpu (all CPU workers), nvdec (all NVDEC sessions) and auto (both
   together): what the decoders deliver when the encoder never waits.
3. end to end: the same job with the chosen backend, for each decoder; clips/s from its summary, with the
   summary's encoder busy fraction and bounding stage.
4. encoder only: the same backend at the job's (B, T), timed as in the encoder benchmark.
5. job overhead: the decoded clips (resized uint8, as the workers send them) are preloaded in memory
   and fed to the job's own inference stage through its public entry point Pipeline.run_preloaded (batch
   assembly into preallocated buffers, the inference thread with runner.infer_uint8: upload,
   normalisation and dtype conversion, L2-normalisation, writer): overhead = (wall time of the stage
   for N batches - N x encoder p50) / (N x encoder p50).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import tempfile
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# 720p H.264 as cameras and sites deliver it: x264's default settings (preset medium, CRF 23, B-frames,
# keyframe interval 250), 30 fps, 10 s. `gop: None` keeps x264's default.
VIDEO_SPEC = {"width": 1280, "height": 720, "fps": 30, "seconds": 10, "codec": "libx264", "gop": None,
              "preset": "medium", "crf": 23, "pix_fmt": "yuv420p"}
# --video-codec: the same scenes in another encoding. hevc10 = HEVC Main10 as phones record it, x265's defaults.
VIDEO_CODECS = {"h264": VIDEO_SPEC,
                "hevc10": {**VIDEO_SPEC, "codec": "libx265", "crf": 28, "pix_fmt": "yuv420p10le"}}


def _encoder_options(spec: dict[str, Any]) -> dict[str, str]:
    options = {"preset": spec["preset"], "crf": str(spec["crf"])}
    if spec["codec"] == "libx265":
        options["x265-params"] = "log-level=0"
    return options


# --- test videos -------------------------------------------------------------------------------------------
def _texture(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth random texture with fine detail (so H.264 has real work, like camera footage)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3)).astype(np.float32)
    smooth = np.repeat(np.repeat(coarse, 16, 0), 16, 1)[:height + 16, :width + 16]
    fine = rng.normal(0, 12, smooth.shape).astype(np.float32)
    return np.clip(smooth + fine, 0, 255).astype(np.uint8)


def write_test_video(path: Path, seed: int, spec: dict[str, Any] = VIDEO_SPEC) -> Path:
    """A panning textured scene with a moving block, H.264 yuv420p, written frame by frame (memory flat)."""
    import av

    from ..fileio import atomic_path

    h, w, fps = spec["height"], spec["width"], spec["fps"]
    tex = _texture(h + 64, w + 64, seed)
    with atomic_path(path) as tmp:
        with av.open(str(tmp), "w", format="mp4") as container:
            stream = container.add_stream(spec["codec"], rate=fps, options=_encoder_options(spec))
            stream.height, stream.width, stream.pix_fmt = h, w, spec.get("pix_fmt", "yuv420p")
            if spec["gop"]:
                stream.codec_context.gop_size = spec["gop"]
            stream.codec_context.time_base = Fraction(1, fps)
            for t in range(spec["seconds"] * fps):
                dy, dx = (2 * t) % 64, (3 * t) % 64
                rgb = np.ascontiguousarray(tex[dy:dy + h, dx:dx + w])
                top, left = (5 * t) % (h - 120), (9 * t) % (w - 160)
                rgb[top:top + 120, left:left + 160] = (40 * seed + 3 * t) % 256
                for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return path


def write_footage_video(path: Path, source: str, start: int, spec: dict[str, Any] = VIDEO_SPEC) -> Path:
    """`spec['seconds']` of real footage from `source` (frames from `start` on, from the beginning again at its
    end), scaled to the spec's size and encoded as the spec says: test videos with a camera's content."""
    import av

    from ..fileio import atomic_path

    fps, count = spec["fps"], spec["seconds"] * spec["fps"]
    with av.open(source) as c:
        total = sum(1 for _ in c.demux(c.streams.video[0])) - 1
    with atomic_path(path) as tmp, av.open(str(tmp), "w", format="mp4") as out:
        stream = out.add_stream(spec["codec"], rate=fps, options=_encoder_options(spec))
        stream.height, stream.width, stream.pix_fmt = spec["height"], spec["width"], spec.get("pix_fmt", "yuv420p")
        if spec["gop"]:
            stream.codec_context.gop_size = spec["gop"]
        written, skip = 0, start % max(total - 1, 1)
        while written < count:
            with av.open(source) as c:
                for i, frame in enumerate(c.decode(video=0)):
                    if i < skip:
                        continue
                    frame = frame.reformat(width=spec["width"], height=spec["height"],
                                           format=spec.get("pix_fmt", "yuv420p"),
                                           interpolation="BICUBIC")
                    frame.pts, frame.time_base = written, Fraction(1, fps)
                    for packet in stream.encode(frame):
                        out.mux(packet)
                    written += 1
                    if written == count:
                        break
            skip = 0
        for packet in stream.encode():
            out.mux(packet)
    return path


def ensure_test_videos(folder: str | Path, count: int, spec: dict[str, Any] = VIDEO_SPEC,
                       processes: int = 1, footage: list[str] | None = None) -> list[Path]:
    """`count` cached test videos in `folder` (made once; names carry the spec): synthetic scenes, or with
    `footage` (video files) 10 s pieces of that real footage, each source in turn at growing offsets."""
    folder = Path(folder)
    name = (f"{spec['width']}x{spec['height']}_{spec['fps']}fps_{spec['seconds']}s_{spec['codec']}_{spec['preset']}"
            f"_gop{spec['gop'] or 'default'}" + ("" if spec.get("pix_fmt", "yuv420p") == "yuv420p" else
                                                  f"_{spec['pix_fmt']}") + ("_footage" if footage else ""))
    paths = [folder / f"{name}_{i:03d}.mp4" for i in range(count)]
    if footage:
        footage = sorted(footage)
        jobs = [(p, footage[i % len(footage)], (i // len(footage)) * 5 * spec["fps"], spec)
                for i, p in enumerate(paths) if not p.is_file()]
        if jobs:
            log.info("writing %d test videos from real footage (%s) into %s", len(jobs), name, folder)
            folder.mkdir(parents=True, exist_ok=True)
            from ..decode.workers import worker_context

            with worker_context().Pool(max(1, min(processes, len(jobs)))) as pool:
                pool.starmap(write_footage_video, jobs)
        return paths
    missing = [(p, i) for i, p in enumerate(paths) if not p.is_file()]
    if missing:
        log.info("writing %d test videos (%s) into %s", len(missing), name, folder)
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        if processes > 1:
            from ..decode.workers import worker_context

            with worker_context().Pool(min(processes, len(missing))) as pool:
                pool.starmap(write_test_video, [(p, i, spec) for p, i in missing])
        else:
            for p, i in missing:
                write_test_video(p, i, spec)
        log.info("test videos written in %.1fs", time.perf_counter() - started)
    return paths


def video_files(folder: str | Path) -> list[Path]:
    from ..decode.inputs import discover

    return [Path(item.path) for item in discover([str(folder)], False) if item.kind == "video"]


# --- decoding ----------------------------------------------------------------------------------------------
def decode_one(path: str, windowing, img_size: int, threads: int = 0) -> dict[str, float]:
    """Decode (+ sample, with `threads` FFmpeg threads) then resize one video as the job's workers do; seconds of
    each part."""
    from ..decode.pyav import read_clips
    from ..transforms import resize_frames

    clips = frames = 0
    decode_s = preprocess_s = 0.0
    started = time.perf_counter()
    for clip in read_clips(path, windowing, threads=threads):
        t0 = time.perf_counter()
        decode_s += t0 - started
        resize_frames(clip.frames, img_size)
        started = time.perf_counter()
        preprocess_s += started - t0
        clips += 1
        frames += len(clip.indices)
    decode_s += time.perf_counter() - started
    return {"clips": clips, "frames": frames, "decode_s": decode_s, "preprocess_s": preprocess_s}


def _ready() -> bool:
    import torch

    torch.set_num_threads(1)
    return True


def _decode_worker(args) -> dict[str, float]:
    import torch

    torch.set_num_threads(1)  # as the job's workers
    return decode_one(*args)


def decode_throughput(paths: list[Path], windowing, img_size: int, workers: int) -> dict[str, Any]:
    """Decode + resize every video with `workers` processes (1: in this process, one torch thread), each with the
    job's default FFmpeg threads for that many workers."""
    from ..decode.plan import default_decode_threads

    threads = default_decode_threads(workers)
    args = [(str(p), windowing, img_size, threads) for p in paths]
    if workers == 1:
        started = time.perf_counter()
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            parts = [decode_one(*a) for a in args]
        finally:
            torch.set_num_threads(threads)
    else:
        from ..decode.workers import worker_context

        with worker_context().Pool(workers) as pool:
            pool.starmap(_ready, [()] * workers * 4)  # processes started (and torch imported) before timing
            started = time.perf_counter()
            parts = pool.map(_decode_worker, args, chunksize=1)
    wall = time.perf_counter() - started
    clips, frames = sum(p["clips"] for p in parts), sum(p["frames"] for p in parts)
    decode_s, pre_s = sum(p["decode_s"] for p in parts), sum(p["preprocess_s"] for p in parts)
    return {"workers": workers, "videos": len(paths), "clips": clips, "sampled_frames": frames,
            "decode_threads": threads, "wall_s": wall, "videos_per_s": len(paths) / wall, "clips_per_s": clips / wall,
            "sampled_frames_per_s": frames / wall, "videos_per_s_per_worker": len(paths) / wall / workers,
            "clips_per_s_per_worker": clips / wall / workers,
            "decode_share": decode_s / max(decode_s + pre_s, 1e-9),
            "cpu_s_per_video_decode": decode_s / len(paths), "cpu_s_per_video_preprocess": pre_s / len(paths)}


# --- the job -----------------------------------------------------------------------------------------------
class NullRunner:
    """An encoder that costs nothing (zero features at once): the job around it runs at its decoders' speed."""

    name = "none"
    max_batch = None
    frame_range = (1, None)
    takes_cuda_frames = True  # GPU-decoded batches stay where they are

    def infer(self, frames) -> np.ndarray:
        return np.zeros((len(frames), 1), np.float32)

    infer_uint8 = infer


def as_inputs(paths: list[Path]) -> list:
    """The job's inputs for `paths`; a video given again (`--repeat`) is another input, under an id of its own."""
    from ..decode.inputs import InputItem

    seen: Counter = Counter()
    items = []
    for p in paths:
        items.append(InputItem(str(p), f"{seen[p]}/{p.name}" if seen[p] else p.name, "video"))
        seen[p] += 1
    return items


def end_to_end(paths: list[Path], runner, windowing, img_size: int, batch: int, workers: int,
               decoder: str = "cpu", nvdec_sessions: int | None = None, gpu_convert: bool = True,
               shared_memory: bool = True, decode_threads: int = 0, probe_processes: int | None = None,
               encoder_graphs: bool = True) -> dict[str, Any]:
    """The real extraction job over `paths` (fresh output folder, no progress bar); its summary."""
    from ..decode.plan import DEFAULT_NVDEC_SESSIONS
    from ..job.local import run_job
    from ..job.pipeline import JobOptions
    from ..output.writer import FeatureWriter

    items = as_inputs(paths)
    options = JobOptions(windowing, img_size, batch, workers, progress=False, decoder=decoder,
                         nvdec_sessions=nvdec_sessions or DEFAULT_NVDEC_SESSIONS, gpu_convert=gpu_convert,
                         shared_memory=shared_memory, decode_threads=decode_threads,
                         probe_processes=probe_processes, encoder_graphs=encoder_graphs)
    with tempfile.TemporaryDirectory(prefix="iv2trt_bench_job_") as out:
        writer = FeatureWriter(out, "float16")
        summary = run_job(items, runner, out, writer, options)
    if summary["failed"]:
        log.warning("%d of %d videos failed in the end-to-end run", summary["failed"], summary["inputs"])
    return summary


def _brief(summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("clips_per_s", "videos_per_s", "clips", "ok", "failed", "seconds", "encoder_busy_fraction", "bound_by",
            "decoders", "first_result_s", "steady_clips_per_s")
    brief = {k: summary.get(k) for k in keys}
    brief["host_cpu_s"] = [p.get("host_cpu_s") for p in summary.get("pipelines", [])]  # where the job's CPU went
    brief["machine_cpu"] = [p.get("machine_cpu") for p in summary.get("pipelines", [])]  # a hypervisor's steal
    return brief


def decoder_runs(paths: list[Path], runner, windowing, img_size: int, batch: int, workers: int,
                 nvdec_sessions: int, auto_workers: list[int] | None = None,
                 cpu_resize: bool = False, decode_threads: list[int] | None = None,
                 pipe: bool = False, probe: bool = False, sessions: list[int] | None = None,
                 graphs: bool = False) -> dict[str, Any]:
    """For each decoder that can run here: the decode ceiling (job with NullRunner) and the job end to end
    with `runner`, on the same videos; then `--decoder auto` with each of `auto_workers` CPU workers; with
    `cpu_resize`, `cpu` and `auto` again with --no-gpu-convert (CPU workers convert and resize themselves); for
    each of `decode_threads`, `cpu` and each `auto` row again with that many FFmpeg threads per worker; with
    `pipe`, `cpu` and `auto` with --no-shared-memory; with `probe`, `nvdec` and `auto` with the demux passes in the
    NVDEC sessions' threads (--nvdec-probe-processes 0); `auto` with each of `sessions` NVDEC sessions; with
    `graphs`, `nvdec` and `auto` with the eager encoder launching every kernel (--no-encoder-graphs)."""
    from ..decode.nvdec import nvdec_unavailable

    reason = nvdec_unavailable()
    decoders = ["cpu"] if reason else ["cpu", "nvdec", "auto"]
    warm = paths[:min(len(paths), 4)]
    for decoder in decoders:  # process start-up, CUDA and NVDEC initialisation outside the timed runs
        end_to_end(warm, runner, windowing, img_size, batch, workers, decoder, nvdec_sessions)
    ceilings, e2e = {}, {}
    for decoder in decoders:
        log.info("decode ceiling, --decoder %s (encoder that costs nothing)", decoder)
        ceilings[decoder] = _brief(end_to_end(paths, NullRunner(), windowing, img_size, batch, workers, decoder,
                                              nvdec_sessions))
        log.info("  %.2f clips/s, %.2f videos/s", ceilings[decoder]["clips_per_s"], ceilings[decoder]["videos_per_s"])
        log.info("end to end, --decoder %s", decoder)
        e2e[decoder] = _brief(end_to_end(paths, runner, windowing, img_size, batch, workers, decoder, nvdec_sessions))
        log.info("  %.2f clips/s, %.2f videos/s; encoder busy %.0f%%, bound by %s", e2e[decoder]["clips_per_s"],
                 e2e[decoder]["videos_per_s"], 100 * e2e[decoder]["encoder_busy_fraction"], e2e[decoder]["bound_by"])
    gpu = "auto" in decoders
    autos = (auto_workers or [None]) if gpu else []
    rows = {"auto_workers": [_variant("auto", n) for n in ((auto_workers or []) if gpu else [])],
            "cpu_resize": [_variant(d, workers, gpu_convert=False) for d in (("cpu", "auto") if cpu_resize and gpu
                                                                            else ())],
            "decode_threads": [_variant(d, n, decode_threads=t) for t in decode_threads or []
                               for d, n in [("cpu", workers)] + [("auto", n) for n in autos]],
            "pipe": [_variant(d, n, shared_memory=False) for d, n in ([("cpu", workers)] + [("auto", autos[0])]
                                                                      if pipe and gpu else [])],
            "probe": [_variant(d, n, probe_processes=0) for d, n in ([("nvdec", workers), ("auto", autos[0])]
                                                                     if probe and gpu else [])],
            "sessions": [_variant("auto", autos[0], nvdec_sessions=k) for k in (sessions or [] if gpu else [])],
            "graphs": [_variant(d, n, encoder_graphs=False) for d, n in ([("nvdec", workers), ("auto", autos[0])]
                                                                         if graphs and gpu else [])]}
    for row in (row for kind in rows.values() for row in kind):
        settings = {k: row[k] for k in ("gpu_convert", "shared_memory", "decode_threads", "probe_processes",
                                        "encoder_graphs")}
        for key, r in (("ceiling", NullRunner()), ("end_to_end", runner)):
            row[key] = _brief(end_to_end(paths, r, windowing, img_size, batch, row["workers"], row["decoder"],
                                         row["nvdec_sessions"] or nvdec_sessions, **settings))
        log.info("%s: ceiling %.2f, end to end %.2f clips/s", variant_label(row), row["ceiling"]["clips_per_s"],
                 row["end_to_end"]["clips_per_s"])
    return {"decoders": decoders, "nvdec_unavailable": reason, "nvdec_sessions": nvdec_sessions, "workers": workers,
            "decode_ceiling": ceilings, "end_to_end": e2e, **rows}


def _variant(decoder: str, workers: int | None, gpu_convert: bool = True, shared_memory: bool = True,
             decode_threads: int = 0, probe_processes: int | None = None, nvdec_sessions: int | None = None,
             encoder_graphs: bool = True) -> dict[str, Any]:
    return {"decoder": decoder, "workers": workers, "gpu_convert": gpu_convert, "shared_memory": shared_memory,
            "decode_threads": decode_threads, "probe_processes": probe_processes, "nvdec_sessions": nvdec_sessions,
            "encoder_graphs": encoder_graphs}


def variant_label(row: dict[str, Any]) -> str:
    """A variant run's row name: its decoder and what differs from the defaults."""
    return f"{row['decoder']}, {row['workers'] or 'default'} CPU workers" + (
        "" if row.get("gpu_convert", True) else ", --no-gpu-convert") + (
        "" if row.get("shared_memory", True) else ", --no-shared-memory") + (
        f", --decode-threads {row['decode_threads']}" if row.get("decode_threads") else "") + (
        f", --nvdec-probe-processes {row['probe_processes']}" if row.get("probe_processes") is not None else "") + (
        f", --nvdec-sessions {row['nvdec_sessions']}" if row.get("nvdec_sessions") else "") + (
        "" if row.get("encoder_graphs", True) else ", --no-encoder-graphs")


# --- the executors -----------------------------------------------------------------------------------------
def executor_runs(paths: list[Path], a, windowing, batch: int, repeat: int = 1) -> list[dict[str, Any]]:
    """The job as trt_inference.py runs it (its settings through the local and the Ray executor, runners built
    where the pipelines run) on the same videos, each `repeat` times under other ids (a longer run from the same
    files): the local job for each `--gpus` of `a.executor_gpus` (e.g. 1 and 0,0: one pipeline, then two on GPU
    0), each with every `a.executor_per_gpu` (--pipelines-per-gpu; 0: the job's default), and with
    `a.executor_ray` the Ray executor with that many pipeline actors on the GPU. Clips/s three ways, alike for both
    executors: over the executor's run (local: the pipelines started; Ray: the actors starting included), from its
    first result to its last, and over the whole call (model loading, Ray's start-up included)."""
    from ..job.local import run_local_job
    from ..job.settings import InferSettings

    items = as_inputs(list(paths) * repeat)
    base = dict(inputs=["bench"], backend="torch", variant=a.variant, checkpoint=a.checkpoint,
                random_init=not a.checkpoint, seed=a.seed, frames=windowing.frames, batch_size=batch,
                window_seconds=windowing.window_seconds, progress=False, decoder="auto", workers=a.job_workers,
                nvdec_sessions=a.nvdec_sessions or 8)
    rows = []
    per_gpu = getattr(a, "executor_per_gpu", None) or [0]
    decoders = getattr(a, "executor_decoders", None) or ["auto"]
    runs = [("local", d, gpus, per) for d in decoders for gpus in a.executor_gpus or [] for per in per_gpu]
    runs += [("ray", d, "1", per) for d in decoders for per in per_gpu] if a.executor_ray else []
    for executor, decoder, gpus, per in runs:
        with tempfile.TemporaryDirectory(prefix="iv2trt_bench_exec_") as out:
            log.info("executor %s, --decoder %s, --gpus %s, --pipelines-per-gpu %s: %d inputs", executor, decoder,
                     gpus, per or "default", len(items))
            called = time.perf_counter()
            settings = InferSettings(**{**base, "decoder": decoder}, output=out, pipelines_per_gpu=per)
            if executor == "local":
                summary = run_local_job(dataclasses.replace(settings, gpus=gpus), items, windowing)
            else:
                from ..distributed.ray_job import run_ray_job

                summary = run_ray_job(dataclasses.replace(settings, ray="local"), items, windowing)
            wall = time.perf_counter() - called
        row = {"executor": executor, "decoder": decoder, "gpus": gpus, "per_gpu": per,
               "pipelines": len(summary["pipelines"]), "ok": summary["ok"],
               "failed": summary["failed"], "clips": summary["clips"], "seconds": summary["seconds"],
               "clips_per_s": summary["clips_per_s"], "encoder_busy_fraction": summary["encoder_busy_fraction"],
               "bound_by": summary["bound_by"], "decoders": summary["decoders"],
               "first_result_s": summary["first_result_s"], "steady_clips_per_s": summary["steady_clips_per_s"],
               "call_s": round(wall, 3), "call_clips_per_s": round(summary["clips"] / wall, 3),
               "machine_cpu": [p.get("machine_cpu") for p in summary["pipelines"]]}
        log.info("  %.1f clips/s over the executor's run, %.1f from its first result to its last, %.1f over the whole "
                 "call (%.1f s, start-up included); %d pipeline(s), bound by %s", row["clips_per_s"],
                 row["steady_clips_per_s"] or 0, row["call_clips_per_s"], wall, row["pipelines"], row["bound_by"])
        rows.append(row)
    return rows


def preload_clips(paths: list[Path], windowing, img_size: int) -> list[list[np.ndarray]]:
    """Every video's clips in memory, exactly as the workers send them (uint8 [T, S, S, 3] resized frames)."""
    from ..decode.inputs import InputItem
    from ..decode.source import iter_clips

    return [[a for _, a in iter_clips(InputItem(str(p), p.name, "video"), windowing, img_size)] for p in paths]


def inference_stage(runner, videos: list[list[np.ndarray]], windowing, img_size: int, batch: int,
                    batches: int) -> dict[str, Any]:
    """Wall time of the job's inference stage on preloaded clips: `batches` full batches' worth of clips
    (videos reused in turn) through Pipeline.run_preloaded (the job's own batching, inference thread,
    normalisation and writing, no decoding)."""
    from ..job.pipeline import JobOptions, Pipeline, WriterSink
    from ..output.writer import FailureLog, FeatureWriter

    want = batches * batch
    feed, total = [], 0
    while total < want:
        clips = videos[len(feed) % len(videos)]
        take = clips[:want - total]
        feed.append(take)
        total += len(take)
    with tempfile.TemporaryDirectory(prefix="iv2trt_bench_stage_") as out:
        writer = FeatureWriter(out, "float16")
        pipeline = Pipeline(runner, JobOptions(windowing, img_size, batch, 1, progress=False),
                            WriterSink(writer, FailureLog(out)))
        summary = pipeline.run_preloaded(feed)
    stage_s = summary["seconds"]
    return {"method": "Pipeline.run_preloaded on preloaded uint8 clips", "seconds": stage_s, "clips": summary["clips"],
            "batches": summary["batches"], "runner_infer_s": summary["infer_seconds"],
            "clips_per_s": summary["clips"] / stage_s}


def starvation_verdict(e2e_cps: float, encoder_cps: float, decode_cps_per_worker: float, workers: int,
                       cores: int) -> dict[str, Any]:
    """Whether the encoder starves, and how many decode workers (cores) would feed it."""
    ratio = e2e_cps / encoder_cps
    needed = math.ceil(encoder_cps / decode_cps_per_worker) if decode_cps_per_worker else None
    decode_bound = ratio < 0.9
    text = (f"end-to-end / encoder-only = {ratio:.3f}: "
            + (f"the encoder starves; decoding gives {decode_cps_per_worker:.2f} clips/s per worker (core), "
               f"so feeding {encoder_cps:.0f} clips/s needs ~{needed} decode cores (job ran {workers}, machine has "
               f"{cores}). Remedies: more decode cores/workers, GPU decoding (NVDEC), decoding fewer frames "
               f"(shorter GOPs let the sampler seek; skip non-reference frames), lower-resolution sources."
               if decode_bound else "the encoder is kept busy (decoding keeps up)."))
    return {"ratio_e2e_over_encoder": ratio, "decode_bound": decode_bound, "decode_cores_needed": needed,
            "verdict": text}


def run_pipeline(runner, backend: str, encoder_cps: float, encoder_batch_s: float, paths: list[Path],
                 windowing, img_size: int, batch: int, worker_counts: list[int], job_workers: int,
                 stage_batches: int, nvdec_sessions: int | None = None,
                 auto_workers: list[int] | None = None, cpu_resize: bool = False,
                 repeat: int = 1, decode_threads: list[int] | None = None, pipe: bool = False,
                 probe: bool = False, sessions: list[int] | None = None, graphs: bool = False) -> dict[str, Any]:
    """All pipeline measurements with one runner; `encoder_cps`/`encoder_batch_s` come from the caller's
    encoder-only timing at (batch, windowing.frames)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    decode = []
    for w in worker_counts:
        some = paths if w > 1 else paths[:4]  # one process: a few videos say enough
        log.info("decode-only, %d worker(s), %d videos", w, len(some))
        decode.append(decode_throughput(some, windowing, img_size, w))
        log.info("  %.2f videos/s, %.2f clips/s, %.1f sampled frames/s", decode[-1]["videos_per_s"],
                 decode[-1]["clips_per_s"], decode[-1]["sampled_frames_per_s"])
    from ..decode.plan import DEFAULT_NVDEC_SESSIONS

    # the inference stage first: a pipeline that decodes on the GPU turns the runner eager (Pipeline.start)
    log.info("preloading clips for the inference-stage measurement")
    videos = preload_clips(paths, windowing, img_size)
    inference_stage(runner, videos, windowing, img_size, batch, 2)  # warm-up (allocator, shapes, CUDA graph)
    short = inference_stage(runner, videos, windowing, img_size, batch, max(2, stage_batches // 4))
    stage = inference_stage(runner, videos, windowing, img_size, batch, stage_batches)
    encoder_s = stage["batches"] * encoder_batch_s
    stage["encoder_s"] = encoder_s
    # whole stage, start-up (thread, pinned buffers, first batch's assembly) and final flush included
    stage["overhead_pct"] = 100.0 * (stage["seconds"] - encoder_s) / encoder_s
    # steady state: the cost of each further batch, from two runs of different length (fixed costs cancel)
    per_batch_s = (stage["seconds"] - short["seconds"]) / max(1, stage["batches"] - short["batches"])
    stage["steady_state_batch_s"] = per_batch_s
    stage["steady_state_overhead_pct"] = 100.0 * (per_batch_s - encoder_batch_s) / encoder_batch_s
    stage["short_run"] = {"batches": short["batches"], "seconds": short["seconds"]}
    runs = decoder_runs(list(paths) * repeat, runner, windowing, img_size, batch, job_workers,
                        nvdec_sessions or DEFAULT_NVDEC_SESSIONS, auto_workers, cpu_resize, decode_threads, pipe,
                        probe, sessions, graphs)
    runs["repeat"] = repeat
    e2e = runs["end_to_end"]["auto" if "auto" in runs["end_to_end"] else "cpu"]
    one = next((d for d in decode if d["workers"] == 1), decode[0])
    verdict = starvation_verdict(e2e["clips_per_s"], encoder_cps, one["clips_per_s_per_worker"],
                                 e2e["decoders"]["cpu"]["workers"], cores)
    return {"backend": backend, "batch": batch, "frames": windowing.frames,
            "windowing": {"window_seconds": windowing.window_seconds, "window_frames": windowing.window_frames,
                          "stride": windowing.stride},
            "videos": len(paths), "video_bytes_mean": float(np.mean([p.stat().st_size for p in paths])),
            "cores": cores, "decode": decode, "end_to_end": e2e, "decoder_runs": runs,
            "encoder_only_clips_per_s": encoder_cps,
            "encoder_only_batch_s": encoder_batch_s, "inference_stage": stage, **verdict}
