"""The machine's CPUs over a pipeline's run, from Linux's /proc/stat: the share busy, idle, and stolen by a
hypervisor (`vmstat`'s `st`).

On a virtual machine a few percent of stolen CPU time slow the GPU path by far more: the NVDEC sessions' host
threads feed a hardware engine and it idles while they wait for a CPU (H200 VMs, 2026-12-04: runs with 4-6% steal
were 15-21% slower than the same command without). The summary says so, so that such a run is not mistaken for the
job's own speed."""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

STEAL_WARNING = 0.02  # the share of CPU time stolen over a run from which the log warns

# /proc/stat's aggregate line: user nice system idle iowait irq softirq steal [guest guest_nice] (the guest
# times are already inside user and nice)
_BUSY, _IDLE, _STEAL = (0, 1, 2, 5, 6), (3, 4), 7


def cpu_times(path: str = "/proc/stat") -> tuple[int, ...] | None:
    """The machine's CPU time by kind so far (clock ticks, all CPUs together); None where there is no /proc/stat."""
    try:
        with open(path) as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    return tuple(int(v) for v in fields[1:9])


def cpu_shares(before: tuple[int, ...] | None, after: tuple[int, ...] | None) -> dict[str, float] | None:
    """The shares of the machine's CPU time between two `cpu_times` readings that were busy, idle (iowait
    included) and stolen; None without both readings or without time between them."""
    if before is None or after is None:
        return None
    spent = [b - a for a, b in zip(before, after)]
    total = sum(spent)
    if total <= 0:
        return None
    return {"busy": round(sum(spent[i] for i in _BUSY) / total, 3),
            "idle": round(sum(spent[i] for i in _IDLE) / total, 3),
            "steal": round(spent[_STEAL] / total, 3)}


def describe(shares: dict[str, float] | None) -> str:
    """'; the machine's CPUs 70% busy, 25% idle, 5% stolen by the hypervisor' (empty without shares)."""
    if not shares:
        return ""
    stolen = f", {100 * shares['steal']:.0f}% stolen by the hypervisor" if shares["steal"] >= 0.005 else ""
    return f"; the machine's CPUs {100 * shares['busy']:.0f}% busy, {100 * shares['idle']:.0f}% idle{stolen}"


def warn_if_stolen(pipelines: list[dict[str, Any]]) -> None:
    """One warning when a hypervisor took STEAL_WARNING or more of a pipeline's machine's CPU time over its run."""
    robbed = [(p.get("name", "?"), p["machine_cpu"]["steal"]) for p in pipelines
              if (p.get("machine_cpu") or {}).get("steal", 0.0) >= STEAL_WARNING]
    if robbed:
        log.warning("the hypervisor took CPU time from this virtual machine during the run (%s; `vmstat`'s st): the "
                    "GPU decoders' threads wait for a CPU meanwhile, so this run's speed is below the machine's",
                    ", ".join(f"{name}: {100 * steal:.0f}%" for name, steal in robbed))
