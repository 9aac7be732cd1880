"""Small synthetic sample videos (PyAV), to try the pipeline without a dataset; also used by the tests."""
from __future__ import annotations

import contextlib
import os
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np


def pattern_frames(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 RGB [count, H, W, 3]: a moving gradient with a bright square, distinct on every frame."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, 3)
    y, x = np.mgrid[0:height, 0:width]
    frames = np.empty((count, height, width, 3), np.uint8)
    for t in range(count):
        for c in range(3):
            frames[t, :, :, c] = (base[c] + 2 * x + y + 9 * t * (c + 1)) % 256
        s = max(2, min(height, width) // 5)
        top, left = (7 * t) % max(1, height - s), (11 * t) % max(1, width - s)
        frames[t, top:top + s, left:left + s] = 255
    return frames


@contextlib.contextmanager
def scheduling_kept() -> Iterator[None]:
    """Around an encode: give the calling thread back its CPU scheduling policy. SVT-AV1 (libsvtav1) puts the
    thread that opens it under SCHED_FIFO at priority 99 where it may (as root); every process started from that
    thread afterwards inherits it, and a real-time thread that spins (ONNX Runtime's pool, a decode worker) then
    starves the rest of the machine."""
    get = getattr(os, "sched_getscheduler", None)
    before = (get(0), os.sched_getparam(0)) if get is not None else None
    try:
        yield
    finally:
        if before is not None and get(0) != before[0]:
            os.sched_setscheduler(0, *before)


def jittered_pts(count: int, step: float, jitter: float, start: float, seed: int = 0) -> np.ndarray:
    """Timestamps as phones and cameras write them: from `start`, durations of `step` +- `jitter` (uniform, units of
    the time base), rounded to whole units."""
    durations = np.random.default_rng(seed).uniform(step - jitter, step + jitter, count)
    return start + np.concatenate([[0], np.cumsum(durations)[:-1]]).round()


def write_video(path: str | Path, frames: np.ndarray, codec: str = "libx264", fps: int = 25,
                rotation: int | None = None, pts: Sequence[int] | None = None, pix_fmt: str | None = None,
                gop: int | None = None, options: dict[str, str] | None = None, colorspace: int | None = None,
                color_range: int | None = None) -> Path:
    """Encode uint8 RGB frames; `pts` (in 1/fps/100 units) makes a variable frame rate video,
    `rotation` (counter-clockwise degrees) sets the display matrix, `colorspace`/`color_range` (AVColorSpace,
    AVColorRange) tag the stream, `options` go to the encoder."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with scheduling_kept(), av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps, options=options or {})
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        if colorspace is not None:
            stream.codec_context.colorspace = colorspace
        if color_range is not None:
            stream.codec_context.color_range = color_range
        stream.pix_fmt = pix_fmt or ("yuvj420p" if codec == "mjpeg" else "yuv420p")
        if gop:
            stream.codec_context.gop_size = gop
        if pts is not None:
            stream.codec_context.time_base = Fraction(1, fps * 100)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = int(pts[i]), Fraction(1, fps * 100)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_image(path: str | Path, rgb: np.ndarray) -> Path:
    """One frame as .png/.jpg through PyAV's image2 muxer."""
    import av

    path = Path(path)
    codec = "png" if path.suffix.lower() == ".png" else "mjpeg"
    with av.open(str(path), "w", format="image2") as container:
        stream = container.add_stream(codec, rate=1)
        stream.height, stream.width = rgb.shape[:2]
        stream.pix_fmt = "rgb24" if codec == "png" else "yuvj420p"
        for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_samples(folder: str | Path) -> list[Path]:
    """A handful of small clips (well under 1 MB together): landscape, portrait-rotated, VP9, an image."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [write_video(folder / "landscape_h264.mp4", pattern_frames(75, 240, 320, seed=1)),
             write_video(folder / "phone_portrait.mp4", pattern_frames(50, 180, 320, seed=2), rotation=-90),
             write_video(folder / "short_mpeg4.avi", pattern_frames(12, 144, 176, seed=3), codec="mpeg4"),
             write_image(folder / "still.jpg", pattern_frames(1, 200, 300, seed=4)[0])]
    try:
        paths.append(write_video(folder / "clip_vp9.webm", pattern_frames(40, 160, 240, seed=5), codec="libvpx-vp9"))
    except Exception:  # an FFmpeg build without VP9: the other samples suffice
        pass
    return paths
