"""summary.json of a run of either executor from its pipelines' summaries (where each one's time went, and per GPU),
and the closing log lines of a local run."""
from __future__ import annotations

import logging
from typing import Any

from ..compare import RunningComparison
from .host import describe, warn_if_stolen
from .pipeline import bound_by
from .stages import log_done, summarize

log = logging.getLogger(__name__)


def _where_time_went(pipelines: list[dict[str, Any]], elapsed: float) -> tuple[dict[str, dict[str, Any]], float]:
    """Decode paths summed over `pipelines` (workers, inputs, clips, clips/s, busy fraction, fallbacks) and their
    encoders' mean busy fraction, over `elapsed` seconds."""
    decoders: dict[str, dict[str, Any]] = {}
    for p in pipelines:
        for path, d in p["decoders"].items():
            total = decoders.setdefault(path, {"workers": 0, "inputs": 0, "clips": 0, "busy_worker_s": 0.0})
            total["workers"] += d["workers"]
            total["inputs"] += d["inputs"]
            total["clips"] += d["clips"]
            total["busy_worker_s"] += d["busy_fraction"] * d["workers"] * p["seconds"]
            if "fallbacks_to_cpu" in d:
                total["fallbacks_to_cpu"] = total.get("fallbacks_to_cpu", 0) + d["fallbacks_to_cpu"]
                by = total.setdefault("fallbacks_by_category", {})
                for category, n in d.get("fallbacks_by_category", {}).items():
                    by[category] = by.get(category, 0) + n
    for d in decoders.values():
        busy = d.pop("busy_worker_s")
        d["clips_per_s"] = round(d["clips"] / max(elapsed, 1e-9), 3)
        d["busy_fraction"] = round(busy / max(elapsed * d["workers"], 1e-9), 3) if d["workers"] else 0.0
    encoder_busy = (sum(p["encoder_busy_fraction"] * p["seconds"] for p in pipelines) /
                    max(elapsed * len(pipelines), 1e-9)) if pipelines else 0.0
    return decoders, round(encoder_busy, 3)


def device_summaries(pipelines: list[dict[str, Any]], elapsed: float) -> dict[str, dict[str, Any]]:
    """summary.json's `per_gpu` of a local run: each device's pipelines (gpu0, gpu0.1, ...: gpu0) taken together:
    clips per decode path, the encoders' busy fraction, what bounded it."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for p in pipelines:
        groups.setdefault(p["name"].split(".")[0], []).append(p)
    out = {}
    for device, ps in groups.items():
        decoders, encoder_busy = _where_time_went(ps, elapsed)
        out[device] = {"pipelines": [p["name"] for p in ps], "clips": sum(d["clips"] for d in decoders.values()),
                       "decoders": decoders, "encoder_busy_fraction": encoder_busy,
                       "bound_by": bound_by(encoder_busy, decoders)}
    return out


def merge_summaries(pipelines: list[dict[str, Any]], counts: dict[str, int], inputs: int, elapsed: float, backend: str,
                    decoder: str) -> dict[str, Any]:
    """summary.json for a run of either executor: its counts (ok, failed, clips: what was written), and where
    each pipeline's time went, with the totals over them."""
    stats = {"ok": counts["ok"], "failed": counts["failed"], "clips": counts["clips"],
             "batches": sum(p["batches"] for p in pipelines),
             "infer_s": sum(p["infer_seconds"] for p in pipelines)}
    summary = summarize(stats, inputs, elapsed, backend, max((p["batch_size"] for p in pipelines), default=0))
    decoders, encoder_busy = _where_time_went(pipelines, elapsed)
    summary.update(decoder=decoder, decoders=decoders, encoder_busy_fraction=encoder_busy,
                   bound_by=bound_by(encoder_busy, decoders), pipelines=pipelines)
    compared = [RunningComparison.from_dict(p["compare_pytorch"]) for p in pipelines if "compare_pytorch" in p]
    if compared:
        total = RunningComparison()
        for c in compared:
            total.merge(c)
        summary["compare_pytorch"] = total.as_dict()
    return summary


def log_summary(summary: dict[str, Any], failures_path) -> None:
    """The closing lines of a local run: totals, then each pipeline's decode paths and encoder."""
    log_done(summary, failures_path)
    for p in summary["pipelines"] if summary["inputs"] else []:
        where = f"pipeline {p['name']} ({p['device']}): " if len(summary["pipelines"]) > 1 else ""
        for name, d in p["decoders"].items():
            log.info("%sdecode %s: %d worker(s), %d inputs, %.1f clips/s, busy %.0f%%%s", where, name, d["workers"],
                     d["inputs"], d["clips_per_s"], 100 * d["busy_fraction"],
                     f", {d['fallbacks_to_cpu']} sent to the CPU ({_categories(d)})" if d.get("fallbacks_to_cpu")
                     else "")
        log.info("%sencoder busy %.0f%% of the run; bound by %s", where, 100 * p["encoder_busy_fraction"],
                 p["bound_by"])
        cpu = p.get("host_cpu_s")
        if cpu:
            log.info("%shost CPU over %.1f s: NVDEC threads %.1f s, batching loop %.1f s, inference thread %.1f s, "
                     "the pipeline's process %.1f s%s", where, p["seconds"], cpu["nvdec_threads"],
                     cpu["pipeline_loop"], cpu["inference_thread"], cpu["process"], describe(p.get("machine_cpu")))
    warn_if_stolen(summary["pipelines"] if summary["inputs"] else [])
    for device, g in summary.get("per_gpu", {}).items() if summary["inputs"] else []:
        if len(g["pipelines"]) > 1:
            log.info("%s, %d pipelines together: %s; encoder busy %.0f%%; bound by %s", device, len(g["pipelines"]),
                     ", ".join(f"{name} {d['clips_per_s']:.1f} clips/s" for name, d in g["decoders"].items()
                               if d["clips"]), 100 * g["encoder_busy_fraction"], g["bound_by"])


def _categories(decoder: dict[str, Any]) -> str:
    return ", ".join(f"{n} {c}" for c, n in sorted(decoder.get("fallbacks_by_category", {}).items()))
