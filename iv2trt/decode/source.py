"""The CPU source: one input -> its clips, decoded with PyAV (pyav.py) and resized (iv2trt.transforms), or read
from a .npy file of preprocessed frames. The CPU decode workers and the Ray decode tasks both call `iter_clips`."""
from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np

from .clips import DecodeError, Windowing
from .gpu_frames import YuvClip
from .inputs import InputItem
from .pyav import read_clips


# --- the CPU path ---------------------------------------------------------------------------------------------
def iter_clips(item: InputItem, w: Windowing, img_size: int, planes: bool = False, threads: int = 0
               ) -> Iterator[tuple[dict[str, Any], Any]]:
    """(clip info, frames) for every clip of one input on the CPU: uint8 [T, S, S, 3] resized frames for videos,
    images and frame folders (normalised later, by the runner); float32 [T, 3, S, S] as stored for .npy
    inputs. With `planes` (a worker of a pipeline on a GPU), 4:2:0 videos (8/10/12-bit) come as `YuvClip`s: the
    planes, for the GPU to convert and resize (gpu_frames.py). `threads`: FFmpeg's threads per video (0: its own
    choice). Raises DecodeError."""
    if item.kind == "npy":
        try:
            array = np.load(item.path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise DecodeError(f"not a readable .npy file ({exc})") from None
        if array.ndim == 4:
            array = array[None]
        if array.ndim != 5 or array.shape[2] != 3 or array.shape[3:] != (img_size, img_size) or not len(array):
            raise DecodeError(f".npy frames must be [B, T, 3, {img_size}, {img_size}] or [T, 3, ...], "
                              f"got {tuple(array.shape)}")
        for clip in array:
            yield {"start_s": math.nan, "end_s": math.nan, "indices": []}, np.asarray(clip, np.float32)
        return
    from ..transforms import resize_frames

    for clip in read_clips(item.path, w, planes, threads):
        info = {"start_s": clip.start_s, "end_s": clip.end_s, "indices": clip.indices}
        yuv = clip.extra.get("yuv")
        yield info, YuvClip(clip.frames, **yuv) if yuv else resize_frames(clip.frames, img_size)
