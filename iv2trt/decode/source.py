"""The CPU source: one input -> its clips, decoded with PyAV (pyav.py) and resized (iv2trt.transforms), or read
from a .npy file of preprocessed frames. The CPU decode workers and the Ray decode tasks both call `iter_clips`."""
from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np

from .clips import DecodeError, Windowing
from .inputs import InputItem
from .pyav import read_clips


# --- the CPU path ---------------------------------------------------------------------------------------------
def iter_clips(item: InputItem, w: Windowing, img_size: int) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
    """(clip info, frames) for every clip of one input on the CPU: uint8 [T, S, S, 3] resized frames for videos,
    images and frame folders (normalised later, by the runner); float32 [T, 3, S, S] as stored for .npy
    inputs. Raises DecodeError."""
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

    for clip in read_clips(item.path, w):
        yield ({"start_s": clip.start_s, "end_s": clip.end_s, "indices": clip.indices},
               resize_frames(clip.frames, img_size))
