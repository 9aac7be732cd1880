"""Partitions of a job's inputs and their shards: the unit of exactly-once output for the Ray executor.

The input list (sorted by id, as `discover` returns it) is cut into partitions of `size` consecutive
inputs: partition p holds inputs [p * size, (p + 1) * size). A partition whose inputs are all committed
already is skipped; the others go through the pipeline, and the driver commits each as ONE shard
(features first, manifest last, both atomic) once every input of it has finished or failed. Its name
(output.results.shard_name, the local job's scheme too), `shards/shard-<p>-<digest of the ids it was run
for>`, depends only on the inputs, so a retried or rerun partition overwrites its own files and never adds
a second copy. `PartitionAssembler` accepts clip rows in any order and any
number of times (Ray retries), keyed by (input, clip): duplicates overwrite, nothing is written twice.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..decode.inputs import InputItem
from ..job.stages import FailureLines, InputClips
from ..output.results import shard_name
from ..output.writer import FailureLog, FeatureWriter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Partition:
    index: int
    numbers: tuple[int, ...]  # positions in the input list of the inputs this run does
    shard: str                # shard name (no suffix), relative to the output directory


def plan_partitions(items: Sequence[InputItem], size: int, done: set[str]) -> tuple[list[Partition], int]:
    """(partitions with inputs to do, number of partitions already committed) for inputs `items`."""
    todo, committed = [], 0
    for index, start in enumerate(range(0, len(items), size)):
        numbers = tuple(n for n in range(start, min(start + size, len(items))) if items[n].id not in done)
        if numbers:
            todo.append(Partition(index, numbers, shard_name(index, [items[n].id for n in numbers])))
        else:
            committed += 1
    return todo, committed


@dataclass
class _Open:
    partition: Partition
    left: set[int]
    finished: dict[int, tuple[list[dict[str, Any]], np.ndarray]] = field(default_factory=dict)  # ok inputs


class PartitionAssembler:
    """Driver side: clip rows -> finished inputs -> committed partitions (one shard each, through `writer`).

    `add_clip(number, clip, info, feature, count)`: `count` is the input's number of clips on its last clip
    row, 0 on the others. `add_failure(number, reason)`: the input failed (rows of it already received are
    dropped). The first outcome of an input counts; rows for a finished input are ignored.
    `on_finished(ok: bool)` is called once per input (progress)."""

    def __init__(self, items: Sequence[InputItem], partitions: Sequence[Partition], writer: FeatureWriter,
                 failures: FailureLog, on_finished: Callable[[bool], None] | None = None):
        self.items, self.writer, self.failures = items, writer, failures
        self.on_finished = on_finished or (lambda ok: None)
        self.open = {p.index: _Open(p, set(p.numbers)) for p in partitions}
        self.partition_of = {n: p.index for p in partitions for n in p.numbers}
        self.videos: dict[int, InputClips] = {}
        self.done: set[int] = set()
        self.stats = {"ok": 0, "failed": 0, "clips": 0, "shards": 0}
        self.said = FailureLines(log)

    @property
    def complete(self) -> bool:
        return not self.open

    def add_clip(self, number: int, clip: int, info: dict[str, Any], feature: np.ndarray, count: int) -> None:
        if number in self.done:
            return
        video = self.videos.setdefault(number, InputClips())
        video.infos[clip], video.features[clip] = info, feature
        if count:
            video.count = count  # known once its last clip arrived
        if video.complete:
            del self.videos[number]
            self._finish(number, video.ordered())

    def add_failure(self, number: int, reason: str) -> None:
        if number in self.done:
            return
        self.videos.pop(number, None)
        item = self.items[number]
        self.failures.add(item.path, item.id, reason)
        self.said.add(item.path, reason)
        self._finish(number, None)

    def _finish(self, number: int, result: tuple[list[dict[str, Any]], np.ndarray] | None) -> None:
        self.done.add(number)
        self.stats["ok" if result is not None else "failed"] += 1
        part = self.open[self.partition_of[number]]
        if result is not None:
            part.finished[number] = result
            self.stats["clips"] += len(result[1])
        part.left.discard(number)
        self.on_finished(result is not None)
        if not part.left:
            self._commit(self.open.pop(part.partition.index))

    def _commit(self, part: _Open) -> None:
        for number in sorted(part.finished):
            item = self.items[number]
            infos, features = part.finished[number]
            self.writer.add_video(item.path, item.id, item.kind, infos, features)
        if part.finished:
            self.writer.flush(name=part.partition.shard)
            self.stats["shards"] += 1
            log.debug("committed partition %d as %s (%d inputs)", part.partition.index, part.partition.shard,
                      len(part.finished))
