"""The planes of CPU workers' clips, handed to the job's process through shared memory rather than the pipe.

A CPU worker of a pipeline that converts on its GPU (gpu_frames.YuvClip) sends each clip's raw planes: about
11 MB for eight 720p frames. Through its pipe they were pickled, written, read and unpickled: two copies in the
job's process, under the GIL that its NVDEC threads and batching loop share. Here each such worker gets a ring
of a few slots in one anonymous shared-memory file (memfd: nothing in /dev/shm, whose 64 MB in a default Docker
container would not hold it, and no name left behind by a killed process). The worker writes a clip's planes
into a free slot and sends `InSlot` in their place; the job's process copies them from the slot to the GPU and
sends the slot's number back. Pages are allocated only as clips touch them, so a slot sized for DCI 4K costs a
720p clip only its own size. Without memfd (not Linux), or for a clip too big for a slot, the pipe carries the
planes as before.
"""
from __future__ import annotations

import logging
import mmap
import os
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

SLOTS = 2                    # per worker: one clip being read by the job's process while the worker writes the next
SLOT_PIXELS = 4096 * 2176    # a slot holds a clip of 8-bit frames up to DCI 4K (rows rounded up to 16, as NVDEC's),
                             # of 10/12-bit ones (two bytes a sample) up to about 2,900 x 1,500


@dataclass(frozen=True)
class InSlot:
    """What a worker's message carries in place of a clip's planes: where they lie in its ring."""

    slot: int
    shape: tuple[int, ...]
    dtype: str = "uint8"    # uint16 for 10/12-bit


def slot_bytes_for(frames: int) -> int:
    """A slot's size for clips of `frames` frames of 8-bit 4:2:0 up to SLOT_PIXELS, in whole pages."""
    size = SLOT_PIXELS * 3 // 2 * max(1, frames)
    return -(-size // mmap.PAGESIZE) * mmap.PAGESIZE


class PlaneRing:
    """`slots` slots of `slot_bytes` each, mapped from the shared-memory file `fd` (the job's process creates it
    with `create`; the worker maps the descriptor it was sent with `PlaneRing(fd, ...)`)."""

    def __init__(self, fd: int, slots: int, slot_bytes: int):
        self.fd, self.slots, self.slot_bytes = fd, slots, slot_bytes
        self._map = mmap.mmap(fd, slots * slot_bytes)

    @classmethod
    def create(cls, frames: int, slots: int = SLOTS) -> "PlaneRing | None":
        """A new ring for clips of `frames` frames, or None where shared memory cannot be had here (the reason
        logged at debug level: the pipe serves)."""
        memfd_create = getattr(os, "memfd_create", None)
        if memfd_create is None:
            log.debug("no os.memfd_create on this platform: planes go through the pipe")
            return None
        size = slot_bytes_for(frames)
        fd = -1
        try:
            fd = memfd_create("iv2trt-planes", getattr(os, "MFD_CLOEXEC", 0))
            os.ftruncate(fd, slots * size)
            return cls(fd, slots, size)
        except OSError as exc:
            log.debug("no shared memory for the planes (%s): they go through the pipe", exc)
            if fd >= 0:
                os.close(fd)
            return None

    def fits(self, planes: np.ndarray) -> bool:
        return planes.nbytes <= self.slot_bytes

    def view(self, slot: int, shape: tuple[int, ...], dtype: str = "uint8") -> np.ndarray:
        """Slot `slot` as an array of `shape` and `dtype` (no copy)."""
        count, itemsize = int(np.prod(shape)), np.dtype(dtype).itemsize
        if not 0 <= slot < self.slots or count * itemsize > self.slot_bytes:
            raise ValueError(f"slot {slot} of {self.slots} cannot hold {dtype} {shape}")
        return np.frombuffer(self._map, dtype, count, slot * self.slot_bytes).reshape(shape)

    def write(self, slot: int, planes: np.ndarray) -> InSlot:
        np.copyto(self.view(slot, planes.shape, planes.dtype.name), planes, casting="no")
        return InSlot(slot, tuple(planes.shape), planes.dtype.name)

    def close_fd(self) -> None:
        """Close the file's descriptor (the mapping stays): once the worker has its own."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        self.close_fd()
        try:
            self._map.close()
        except BufferError:  # a view still in use: the mapping goes with it
            pass
