"""Why a file did not go through NVDEC: the GPU path's errors and their one-word categories, which the job counts
per category in its summary (the CPU path decodes every such file)."""
from __future__ import annotations

from typing import Iterable

from .clips import DecodeError

FALLBACK_CATEGORIES = ("codec", "bit_depth", "chroma", "size", "timestamps", "stream_error", "frames_missing")


class NvdecError(DecodeError):
    """A file the GPU path did not decode; the CPU path takes it. `reason` says why in one line, `category` in one
    word (FALLBACK_CATEGORIES): codec (this GPU's NVDEC does not decode the codec), bit_depth or chroma (its pixel
    format), size, timestamps (its frames cannot be matched to the plan), stream_error (NVDEC or its demuxer
    failed on the data), frames_missing (NVDEC gave fewer frames than the clips need)."""

    def __init__(self, reason: str, category: str = "stream_error"):
        if category not in FALLBACK_CATEGORIES:
            raise ValueError(f"unknown fallback category {category!r}")
        super().__init__(reason)
        self.category = category


class NvdecUnsupported(NvdecError):
    """An input the GPU decoders cannot take, refused before anything was decoded on the GPU."""

    def __init__(self, reason: str, category: str = "codec"):
        super().__init__(reason, category)


def refuse_timestamps(probe) -> None:
    """The demux pass's check, before anything is decoded: frames NVDEC gives back are matched by timestamp."""
    if not probe.seekable:
        raise NvdecUnsupported("frame timestamps missing or repeated", "timestamps")


def fallback_category(exc: BaseException) -> str:
    """The category of a GPU-path failure: an NvdecError's own; anything else (an error of the driver or of
    PyTorch) counts as stream_error."""
    return exc.category if isinstance(exc, NvdecError) else "stream_error"


def count_fallbacks(causes: Iterable[BaseException | str]) -> dict[str, int]:
    """{category: count} over GPU-path failures (exceptions or their categories), every category present."""
    counts = dict.fromkeys(FALLBACK_CATEGORIES, 0)
    for cause in causes:
        counts[cause if isinstance(cause, str) else fallback_category(cause)] += 1
    return counts
