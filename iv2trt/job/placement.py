"""Where a local job's pipelines run: `--gpus` read against this machine's GPUs, `--pipelines-per-gpu` on each."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from ..errors import PipelineError


@dataclass(frozen=True)
class PipelineSpec:
    """One pipeline: its GPU (this process's index; None: the CPU), its share of the machine's cores, and which of
    its GPU's pipelines it is (0, 1, ...)."""

    gpu: int | None
    share: float = 1.0
    slot: int = 0

    @property
    def name(self) -> str:
        base = "cpu" if self.gpu is None else f"gpu{self.gpu}"
        return base if not self.slot else f"{base}.{self.slot}"


def select_gpus(gpus: str, count: int, names: Sequence[str] = ()) -> list[int]:
    """`--gpus`: all | none | N (the first N) | I,J,... (those GPUs; an index twice: two pipelines on that GPU, a
    single one written `I,`). PipelineError listing the GPUs for an index or count this machine lacks."""
    text = str(gpus).strip().lower()
    listing = ", ".join(f"{i}: {n}" for i, n in enumerate(names)) or "none"
    if text in ("all", ""):
        return list(range(count))
    if text in ("none", "cpu", "0"):
        return []
    try:
        if "," not in text:
            n = int(text)
            if n < 0 or n > count:
                raise IndexError(n)
            return list(range(n))
        chosen = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise PipelineError(f"--gpus {gpus}: give all, none, a number of GPUs or indices such as 0,2 (GPUs here: "
                            f"{listing})") from None
    except IndexError:
        raise PipelineError(f"--gpus {gpus}: this machine has {count} GPU(s) ({listing})") from None
    bad = [i for i in chosen if not 0 <= i < count]
    if bad or not chosen:
        raise PipelineError(f"--gpus {gpus}: no GPU {bad[0] if bad else ''} here; GPUs: {listing} (set "
                            "CUDA_VISIBLE_DEVICES to choose among more)")
    return chosen


def pipeline_specs(gpus: str, per_gpu: int = 1, count: int | None = None,
                   names: Sequence[str] = ()) -> list[PipelineSpec]:
    """The pipelines of a local job, sharing the CPU decode workers: `per_gpu` on each GPU `--gpus` selects (an
    index given k > 1 times: k there); one CPU pipeline without GPUs. `count`/`names`: this machine's GPUs (by
    default asked of the driver)."""
    if count is None:
        from ..engine.cuda_env import gpu_count, gpu_info

        count = gpu_count()
        names = [(gpu_info(i) or {}).get("name", "?") for i in range(count)]
    chosen = select_gpus(gpus, count, names)
    if not chosen:
        return [PipelineSpec(None)]
    times = Counter(chosen)
    gpus_in_order = list(dict.fromkeys(chosen))
    total = sum(k if k > 1 else per_gpu for k in times.values())
    return [PipelineSpec(g, 1.0 / total, slot) for g in gpus_in_order
            for slot in range(times[g] if times[g] > 1 else per_gpu)]
