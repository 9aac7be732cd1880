"""Which frames make each clip: upstream's test-time sampling (T frames, the middle of T equal segments) over
the whole video or over sliding windows of seconds or frames, from the frames' timestamps (variable frame rate
works). Shared by the CPU path (pyav.py) and the GPU path (nvdec.py), so both decode the same frames."""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

FOLDER_FPS = 30.0  # frame rate assumed for folders of frames (window_seconds)


class DecodeError(Exception):
    """An input that cannot be turned into frames; `reason` says why in one line."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def failure_reason(exc: Exception) -> str:
    """An input's failure reason from what its decoder raised: a DecodeError's own reason; for anything else (a
    decoder bug must not stop the job) the exception's type and message."""
    return exc.reason if isinstance(exc, DecodeError) else f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class Windowing:
    """How clips are cut: the whole video (default), or windows of `size` seconds or frames every `stride`."""

    frames: int = 8                 # T: frames per clip
    window_seconds: float | None = None
    window_frames: int | None = None
    stride: float | None = None     # in the window's unit; default: the window size (no overlap)

    def __post_init__(self):
        if self.frames < 1:
            raise ValueError("frames must be >= 1")
        if self.window_seconds is not None and self.window_frames is not None:
            raise ValueError("set window_seconds or window_frames, not both")
        if any(v is not None and not v > 0 for v in (self.window_seconds, self.window_frames, self.stride)):
            raise ValueError("window size and stride must be positive")


@dataclass
class Clip:
    frames: np.ndarray              # uint8 [T, H, W, 3] RGB
    indices: list[int]              # frame numbers in presentation order
    start_s: float                  # window in seconds
    end_s: float
    extra: dict = field(default_factory=dict)


def sample_indices(num_frames: int, clip_frames: int) -> list[int]:
    """Upstream's test-time sampling: middle frame of T equal segments, last frame repeated if n < T."""
    if num_frames < 1:
        raise ValueError("no frames to sample from")
    segments = min(clip_frames, num_frames)
    bounds = np.linspace(0, num_frames, segments + 1).astype(int)
    picked = [int((bounds[i] + bounds[i + 1] - 1) // 2) for i in range(segments)]
    return picked + [picked[-1]] * (clip_frames - segments)


def window_ranges(times: np.ndarray, duration: float, w: Windowing) -> list[tuple[int, int, float, float]]:
    """[(first frame, end frame exclusive, start s, end s)] for each window; one window when not windowed.

    Windows start every stride; a last window aligned to the end is added so every frame is covered.
    """
    n = len(times)
    if w.window_frames is None and w.window_seconds is None:
        return [(0, n, 0.0, duration)]
    if w.window_frames is not None:
        size, stride = int(w.window_frames), int(w.stride or w.window_frames)
        starts = list(range(0, max(n - size, 0) + 1, stride))
        if starts[-1] + size < n:
            starts.append(n - size)
        out = []
        for a in starts:
            b = min(a + size, n)
            out.append((a, b, float(times[a]), float(times[b]) if b < n else duration))
        return out
    size, stride = float(w.window_seconds), float(w.stride or w.window_seconds)
    count = max(1, math.floor((duration - size) / stride + 1e-9) + 1) if duration > size else 1
    starts_s = [i * stride for i in range(count)]
    if duration > size and starts_s[-1] + size < duration - 1e-9:
        starts_s.append(duration - size)
    out, sorted_times = [], times.tolist()
    for t0 in starts_s:
        t1 = min(t0 + size, duration)
        a = bisect.bisect_left(sorted_times, t0 - 1e-9)
        b = bisect.bisect_left(sorted_times, t1 - 1e-9)
        if b <= a:  # a window between two frames of a sparse video: take the nearest frame
            a, b = min(a, n - 1), min(a, n - 1) + 1
        out.append((a, b, t0, t1))
    return out


def plan_clips(times: np.ndarray, duration: float, w: Windowing) -> list[tuple[list[int], float, float]]:
    """[(frame indices, start s, end s)] of every clip of a video whose frames are at `times`."""
    return [([a + i for i in sample_indices(b - a, w.frames)], t0, t1)
            for a, b, t0, t1 in window_ranges(times, duration, w)]


class ClipAssembler:
    """Collects decoded frames and yields each clip as soon as all of its frames are there (memory flat).
    `stack` joins a clip's frames (np.stack here; torch.stack for frames on the GPU)."""

    def __init__(self, plan, stack=np.stack):
        self.plan, self.stack = plan, stack
        self.next_clip = 0
        self.frames: dict[int, np.ndarray] = {}

    @property
    def done(self) -> bool:
        return self.next_clip == len(self.plan)

    def add(self, index: int, rgb: np.ndarray) -> Iterator[Clip]:
        self.frames[index] = rgb
        while self.next_clip < len(self.plan) and all(i in self.frames for i in self.plan[self.next_clip][0]):
            idx, t0, t1 = self.plan[self.next_clip]
            self.next_clip += 1
            yield Clip(self.stack([self.frames[i] for i in idx]), idx, t0, t1)
            keep = min((min(p[0]) for p in self.plan[self.next_clip:]), default=None)
            self.frames = {i: f for i, f in self.frames.items() if keep is not None and i >= keep}

    def needed(self) -> list[int]:
        return needed_frames(self.plan)


def plan_by_count(count: int, rate: float, w: Windowing) -> list[tuple[list[int], float, float]]:
    """The clips of `count` frames at a constant `rate` (frame i at i / rate): folders of images, or videos
    whose timestamps cannot be trusted."""
    return plan_clips(np.arange(count) / rate, count / rate, w)


def needed_frames(plan) -> list[int]:
    """Every frame index some clip of `plan` takes, sorted."""
    return sorted({i for idx, _, _ in plan for i in idx})
