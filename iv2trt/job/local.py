"""The local executor: pipelines on this machine (job/pipeline.py), `--pipelines-per-gpu` per GPU, fed from one
queue; this process is the only writer.

One pipeline runs in this process where the job has the CPU or GPU 0 alone with one pipeline. Otherwise each
pipeline runs in a process of its own (spawned, its GPU made the process's only one through CUDA_VISIBLE_DEVICES)
with its NVDEC sessions, its share of the CPU decode workers and its runner: NVDEC threads of several GPUs in one
process would share one GIL, and one process's NVDEC sessions left an H200's decoders idle a quarter of the time
(two processes per GPU by default where NVDEC decodes). This process keeps each pipeline a few inputs ahead of what
its decoders have started (QueuedAhead) and tells it its share of what is left (its tail rule), writes what comes
back (shards, failures.jsonl) and commits exactly as before, so resume, shards and exactly-once do not depend on
how many pipelines ran. A pipeline process that dies loses nothing: its unfinished inputs go back to the queue for
the others (an input that two dying pipelines held is failed), and the job goes on with the rest and says so.
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
from collections import Counter, deque
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Sequence

import numpy as np

from ..compare import RunningComparison
from ..decode.inputs import InputItem
from ..decode.plan import check_decoder, pipelines_per_gpu
from ..decode.workers import start_worker_server
from ..errors import PipelineError
from ..output.writer import FailureLog, FeatureWriter, prepare_output, write_summary
from ..runners.choice import encoder_on_cpu
from .factory import SettingsRunner, close_runner, describe_runner, reference_runner
from .identity import complete_identity, finish_summary
from .pipeline import JobOptions, Pipeline, bound_by
from .host import describe, warn_if_stolen
from .stages import FailureLines, ResultClock, log_done, summarize, whole_run

log = logging.getLogger(__name__)

DIED_TWICE = "the pipeline processes decoding it died twice"


# --- where pipelines run --------------------------------------------------------------------------------------
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


# --- pipelines as the executor sees them ----------------------------------------------------------------------
class _Events:
    """A pipeline's sink that keeps what it hands over, for the executor to take."""

    def __init__(self):
        self.items: list[tuple] = []

    def finished(self, number: int, item: InputItem, infos: list[dict[str, Any]], features: np.ndarray) -> None:
        self.items.append(("finished", number, infos, features))

    def failed(self, number: int, item: InputItem, reason: str) -> None:
        self.items.append(("failed", number, reason))

    def take(self) -> list[tuple]:
        out, self.items = self.items, []
        return out


class _InProcess:
    """A pipeline in this process: fed everything at once, stepped by the executor's loop."""

    def __init__(self, pipeline: Pipeline, events: _Events):
        self.pipeline, self.events, self.name = pipeline, events, pipeline.name
        self.assigned: set[int] = set()
        self.result: dict[str, Any] | None = None
        self.gone: str | None = None

    def wants(self) -> bool:
        return True

    def feed(self, number: int, item: InputItem) -> None:
        self.assigned.add(number)
        self.pipeline.feed(number, item)

    def fed_all(self, backlog: int = 0) -> None:
        self.pipeline.fed_all(backlog)

    def no_more(self) -> None:
        """Close the pipeline and take its summary, as a pipeline process does when told it is done."""
        self.close(interrupted=False)

    def poll(self) -> list[tuple]:
        if self.pipeline.busy:
            self.pipeline.step()
        return self.events.take()

    def close(self, interrupted: bool) -> None:
        self.pipeline.close(interrupted)
        if self.result is None:
            self.result = self.pipeline.summary()


QUEUED_AHEAD = 2  # inputs a pipeline process holds beyond what its decoders have started (at least; workers // 4)


class QueuedAhead:
    """How many inputs fed to a pipeline process its decoders have not started yet, as far as the executor can
    tell: what the process last said it had queued, plus what was fed after the feeds it had seen then."""

    def __init__(self, most: int = QUEUED_AHEAD):
        self.most, self.sent, self.queued, self.seen = most, 0, 0, 0

    def fed(self) -> None:
        self.sent += 1

    def report(self, queued: int, seen: int) -> None:
        self.queued, self.seen = queued, seen

    @property
    def count(self) -> int:
        return self.queued + self.sent - self.seen

    def wants(self) -> bool:
        return self.count < self.most


class _Process:
    """A pipeline in a process of its own (`_pipeline_main`), fed through a pipe: a few inputs ahead of what its
    decoders have started (QUEUED_AHEAD), so that at the job's end no pipeline sits on inputs another one could
    take (before, each held up to twice its workers' count)."""

    def __init__(self, ctx, spec: PipelineSpec, factory: SettingsRunner, options: JobOptions, compare: Any,
                 verbose: bool):
        self.spec, self.name = spec, spec.name
        self.conn, child = ctx.Pipe(duplex=True)
        # not a daemon: its own decode workers are processes
        self.process = ctx.Process(target=_pipeline_main, name=f"iv2trt-{spec.name}",
                                   args=(child, spec, factory, options, compare, verbose))
        self.process.start()
        child.close()
        self.assigned: set[int] = set()
        self.capacity = 4
        self.queued = QueuedAhead()
        self.info: dict[str, Any] | None = None
        self.result: dict[str, Any] | None = None
        self.gone: str | None = None
        self.finishing = self.stopping = False
        self.told_backlog: int | None = None

    def ready(self, timeout: float | None = None) -> dict[str, Any]:
        """The runner's description once the pipeline is up; raises what the process raised (a PipelineError
        keeps its type, so its exit code)."""
        if not self.conn.poll(timeout):
            raise PipelineError(f"pipeline {self.name} did not start within {timeout:g} s")
        try:
            message = self.conn.recv()
        except (EOFError, OSError):
            self.process.join(5)
            raise RuntimeError(f"pipeline {self.name} died while starting (exit code {self.process.exitcode})")
        if message[0] == "error":  # a PipelineError as raised there; anything else as its text and traceback
            if isinstance(message[1], BaseException):
                raise message[1]
            raise RuntimeError(f"pipeline {self.name} failed while starting: {message[1]}")
        _, self.info, workers = message
        self.capacity = 4 * workers + 8  # (a bound only: its decoders' inputs, those in batches, QUEUED_AHEAD)
        self.queued.most = max(QUEUED_AHEAD, workers // 4)
        return self.info

    def wants(self) -> bool:
        return self.gone is None and len(self.assigned) < self.capacity and self.queued.wants()

    def feed(self, number: int, item: InputItem) -> None:
        self.assigned.add(number)
        self.queued.fed()
        self.told_backlog = None
        self._send(("feed", number, item))

    def fed_all(self, backlog: int = 0) -> None:
        if self.told_backlog != backlog:
            self.told_backlog = backlog
            self._send(("fed_all", backlog))

    def no_more(self) -> None:
        if not self.finishing:
            self.finishing = True
            self._send(("done",))

    def _send(self, message: tuple) -> None:
        try:
            self.conn.send(message)
        except (BrokenPipeError, OSError):
            self._died()

    def poll(self) -> list[tuple]:
        events = []
        try:
            while self.gone is None and self.conn.poll():
                message = self.conn.recv()
                if message[0] == "summary":
                    self.result = message[1]
                elif message[0] == "queued":
                    self.queued.report(message[1], message[2])
                elif message[0] == "error":
                    if isinstance(message[1], PipelineError):
                        raise message[1]
                    log.error("pipeline %s stopped: %s", self.name, message[1])
                    self._died()
                else:
                    events.append(message)
        except (EOFError, OSError):
            self._died()
        return events

    def _died(self) -> None:
        if self.gone is None:
            self.process.join(2)
            code = self.process.exitcode
            self.gone = f"exit code {code}" if code is not None else "stopped answering"

    def stop(self, interrupted: bool) -> None:
        """Tell the process to stop, unless it sent its summary (then it exits by itself); `close` waits for it.
        (No wait here: the executor tells every process before waiting for any.)"""
        if self.gone is None and not interrupted and not self.stopping and self.result is None:
            self.stopping = True
            try:
                self.conn.send(("stop",))
            except OSError:  # gone already: `close` finds out
                pass

    def close(self, interrupted: bool) -> None:
        if self.conn.closed:
            return
        self.stop(interrupted)
        if self.gone is None and not interrupted:
            self.process.join(30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.conn.close()


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when the executor dies (kill -9 included), so no pipeline outlives it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _pipeline_main(conn, spec: PipelineSpec, factory: SettingsRunner, options: JobOptions, compare: Any,
                   verbose: bool) -> None:
    """A pipeline process: build the runner on this GPU, report it, then take inputs and hand back results until
    told `done` (then the summary) or `stop`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the executor's business
    _die_with_parent()
    if spec.gpu is not None:  # its GPU becomes the only one it sees (GPU 0 here), before CUDA starts
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = visible.split(",")[spec.gpu] if visible else str(spec.gpu)
    from ..settings import setup_logging

    setup_logging(verbose, tag=f"[{spec.name}]")
    quiet_start = spec.slot > 0 and not verbose  # its start-up lines are its GPU's first pipeline's (-v: all of them)
    if quiet_start:
        logging.getLogger().setLevel(logging.WARNING)
    pipeline = runner = reference = None
    events = _Events()
    try:
        start_worker_server()  # comes up while the runner is built
        runner = factory()
        info = describe_runner(runner, factory.settings, options.windowing.frames)
        reference = reference_runner(compare, info["identity"]) if compare is not None else None
        options = dataclasses.replace(options, img_size=info["img_size"], gpu=0)
        pipeline = Pipeline(runner, options, events, reference, spec.name).start()
        if quiet_start:
            logging.getLogger().setLevel(logging.INFO)
        conn.send(("ready", info, len(pipeline.workers)))
        finishing = False
        seen, said = 0, (0, 0)  # feeds received; the (queued, seen) last told (QueuedAhead)
        while True:
            while conn.poll():
                message = conn.recv()
                if message[0] == "feed":
                    pipeline.feed(message[1], message[2])
                    seen += 1
                elif message[0] == "fed_all":
                    pipeline.fed_all(message[1])
                elif message[0] == "done":
                    finishing = True
                else:
                    return
            if pipeline.busy:
                pipeline.step(also_wait=[conn])
            elif finishing:
                break
            else:
                wait([conn], timeout=1.0)
            for event in events.take():
                conn.send(event)
            if (pipeline.queued, seen) != said:
                said = (pipeline.queued, seen)
                conn.send(("queued", *said))
        pipeline.close()
        conn.send(("summary", pipeline.summary()))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the executor is gone
    except PipelineError as exc:
        _send_quietly(conn, ("error", exc))
    except BaseException as exc:  # noqa: BLE001 - reported to the executor, which goes on without this pipeline
        _send_quietly(conn, ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        if pipeline is not None:
            pipeline.close(interrupted=True)
        for r in (runner, reference):
            if r is not None:
                close_runner(r)


def _send_quietly(conn, message: tuple) -> None:
    try:
        conn.send(message)
    except (BrokenPipeError, OSError):
        pass


# --- the executor ---------------------------------------------------------------------------------------------
class _Writing:
    """Finished inputs -> the writer and failures.jsonl, with the progress bar and the run's counts."""

    def __init__(self, items: Sequence[InputItem], writer: FeatureWriter, failures: FailureLog, bar):
        self.items, self.writer, self.failures, self.bar = items, writer, failures, bar
        self.ok = self.failed = self.clips = 0
        self.clock = ResultClock()
        self.said = FailureLines(log)

    def finished(self, number: int, infos: list[dict[str, Any]], features: np.ndarray) -> None:
        item = self.items[number]
        self.writer.add_video(item.path, item.id, item.kind, infos, features)
        self.ok += 1
        self.clips += len(features)
        self.clock.add(len(features))
        self.bar.update(1)

    def fail(self, number: int, reason: str) -> None:
        item = self.items[number]
        self.failures.add(item.path, item.id, reason)
        self.failed += 1
        self.said.add(item.path, reason)
        self.bar.update(1)


def execute(handles: list, items: Sequence[InputItem], todo: Sequence[int], writer: FeatureWriter,
            failures: FailureLog, progress: bool) -> tuple[_Writing, float]:
    """Feed `todo` (numbers into `items`) to the pipelines, write what comes back; returns the counts and the
    seconds it took. Inputs of a pipeline that dies go to the others."""
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="video", disable=not progress, mininterval=1.0, dynamic_ncols=True,
               file=sys.stderr)
    out = _Writing(items, writer, failures, bar)
    queue, attempts = deque(todo), Counter()
    live = list(handles)
    started = time.perf_counter()
    interrupted = False
    ended = None
    try:
        while live and (queue or any(h.assigned for h in live)):
            for h in live:  # `no_more` only after the loop: a pipeline that dies hands its inputs back to the others
                while queue and h.wants():
                    number = queue.popleft()
                    h.feed(number, items[number])
            for h in live:  # each pipeline's share of what is left here (0: what they hold is the job's tail)
                h.fed_all(len(queue) // len(live))
            if len(live) > 1 or not isinstance(live[0], _InProcess):
                wait([h.conn for h in live if isinstance(h, _Process)], timeout=0.2)
            for h in live:
                for event in h.poll():
                    h.assigned.discard(event[1])
                    if event[0] == "finished":
                        out.finished(event[1], event[2], event[3])
                    else:
                        out.fail(event[1], event[2])
            for h in [h for h in live if h.gone]:
                live.remove(h)
                back = sorted(h.assigned)
                attempts.update(back)
                for number in back:
                    if attempts[number] >= 2:
                        out.fail(number, DIED_TWICE)
                h.assigned.clear()
                queue.extendleft(reversed([n for n in back if attempts[n] < 2]))
                log.warning("pipeline %s died (%s); its %d unfinished input(s) go to the %d other pipeline(s)", h.name,
                            h.gone, len(back), len(live))
            elapsed = time.perf_counter() - started
            bar.set_postfix_str(f"{out.clips / max(elapsed, 1e-9):.1f} clips/s", refresh=False)
        if queue or any(h.assigned for h in handles):
            raise RuntimeError(f"every pipeline stopped ({', '.join(f'{h.name}: {h.gone}' for h in handles)}); "
                               "committed results are kept: rerun to finish the rest")
        asked = time.perf_counter()
        for h in live:  # their summaries, asked of all at once (each process closes its pipeline first)
            h.no_more()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            waiting = [h for h in live if isinstance(h, _Process) and h.result is None and h.gone is None]
            if not waiting:
                break
            wait([h.conn for h in waiting], timeout=0.5)
            for h in waiting:
                h.poll()
        log.debug("summaries of %d pipeline(s) in %.2f s after the last result", len(live),
                  time.perf_counter() - asked)
        writer.flush()
        ended = time.perf_counter()  # every result written: the processes' exits (CUDA, interpreter) come after,
        # as the job's own exit does after a pipeline in this process
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        closing = time.perf_counter()
        for h in handles:  # all told first: their processes exit side by side
            if isinstance(h, _Process):
                h.stop(interrupted)
        for h in handles:
            h.close(interrupted)
        log.debug("pipelines closed in %.2f s", time.perf_counter() - closing)
        bar.close()
        writer.flush()  # finished videos are kept even when the job stops early
        out.said.close()
    return out, (ended or time.perf_counter()) - started


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


def run_job(items: list[InputItem], runner, out_dir, writer: FeatureWriter, options: JobOptions,
            reference=None, skipped: int = 0) -> dict[str, Any]:
    """One pipeline in this process over `items` with `runner`; writes summary.json (counts, speeds, where the
    time went) and returns the summary."""
    failures = FailureLog(out_dir)
    events = _Events()
    pipeline = Pipeline(runner, options, events, reference).start(items)
    out, elapsed = execute([_InProcess(pipeline, events)], items, range(len(items)), writer, failures,
                           options.progress)
    summary = merge_summaries([pipeline.summary()], vars(out), len(items), elapsed, runner.name, options.decoder)
    summary.update(skipped_already_done=skipped, **out.clock.steady())
    write_summary(out_dir, summary)
    log_summary(summary, failures.path)
    return summary


def _started(handles: list[_Process]) -> tuple[list[_Process], list[dict[str, Any]]]:
    """The pipelines that came up, and their runners' descriptions. One that died or failed while starting (e.g. out
    of GPU memory) is left out and the job goes on with the others, saying so; a PipelineError (the user's settings,
    the same in every pipeline) stops the job, as does no pipeline starting."""
    up, infos = [], []
    for h in handles:
        try:
            infos.append(h.ready(timeout=600))
            up.append(h)
        except PipelineError:
            for other in handles:
                other.close(interrupted=True)
            raise
        except RuntimeError as exc:
            h.close(interrupted=True)
            if h is handles[-1] and not up:
                raise
            log.warning("%s; the job goes on without it (--pipelines-per-gpu 1 for one pipeline per GPU)",
                        str(exc).splitlines()[0])
    return up, infos


def run_local_job(s, items: Sequence[InputItem], windowing, specs: Sequence[PipelineSpec] | None = None
                  ) -> dict[str, Any]:
    """Run the job described by settings `s` (job.settings.InferSettings) over `items` on this machine: one
    pipeline per selected GPU (`specs`, by default from --gpus), in this process when it is the only one and on
    GPU 0 or the CPU; returns the summary (written to summary.json)."""
    called = time.perf_counter()
    if not specs:
        per_gpu = pipelines_per_gpu(s.pipelines_per_gpu, s.decoder,
                                    encoder_on_cpu=not s.pipelines_per_gpu and encoder_on_cpu(s))
        specs = pipeline_specs(s.gpus, per_gpu)
        if per_gpu > 1 and specs[0].gpu is not None and not s.pipelines_per_gpu:
            log.info("%d pipeline processes per GPU, each with its own NVDEC sessions (one process's sessions leave "
                     "the GPU's decoders idle part of the time; --pipelines-per-gpu 1 for one)", per_gpu)
    specs = list(specs)
    factory = SettingsRunner(s)
    options = JobOptions(windowing, 224, s.batch_size, s.workers, s.decode_timeout_s, s.progress, s.decoder,
                         s.nvdec_sessions, gpu_convert=s.gpu_convert, shared_memory=s.shared_memory,
                         decode_threads=s.decode_threads,
                         probe_processes=s.nvdec_probe_processes, encoder_graphs=s.encoder_graphs)
    compare = s if s.compare_pytorch else None
    if compare is not None and len(specs) > 1:
        log.info("--compare-pytorch runs one pipeline (GPU %s)", specs[0].gpu)
        specs = specs[:1]
    handles: list = []
    try:
        if len(specs) == 1 and specs[0].gpu in (None, 0):
            check_decoder(s.decoder)  # (before the model loads: --decoder nvdec without NVDEC is exit 4)
            start_worker_server()  # comes up while the runner is built
            runner = factory()
            info = describe_runner(runner, s, s.frames)
            reference = reference_runner(s, info["identity"]) if compare is not None else None
            options = dataclasses.replace(options, img_size=info["img_size"])
            events = _Events()
            handles = [_InProcess(Pipeline(runner, options, events, reference, specs[0].name), events)]
            infos = [info]
        else:
            ctx = mp.get_context("spawn")
            verbose = logging.getLogger().isEnabledFor(logging.DEBUG)
            for spec in specs:
                share = dataclasses.replace(options, workers=max(1, int(s.workers * spec.share)) if s.workers else None,
                                            cpu_share=spec.share)
                handles.append(_Process(ctx, spec, factory, share, compare, verbose))
            handles, infos = _started(handles)
            if len({(i["name"], i["img_size"], i["feature_dim"]) for i in infos}) > 1:
                raise PipelineError("the GPUs' pipelines disagree on the model: "
                                    + "; ".join(f"{h.name}: {i['name']} {i['img_size']}px" for h, i in zip(handles,
                                                                                                         infos)))
        identity = complete_identity(infos[0]["identity"], s)
        done = prepare_output(s.output, identity, s.overwrite)
        todo = [n for n, item in enumerate(items) if item.id not in done]
        log.info("%d inputs found, %d to do, %d already done in %s; %d pipeline(s): %s", len(items), len(todo),
                 len(items) - len(todo), s.output, len(handles),
                 ", ".join(f"{h.name} ({i['name']} on {i['device']})" for h, i in zip(handles, infos)))
        if isinstance(handles[0], _InProcess):
            handles[0].pipeline.start([items[n] for n in todo])
        writer = FeatureWriter(s.output, s.dtype, s.shard_size, s.per_video_npy, s.commit_seconds)
        failures = FailureLog(s.output)
        start_s = time.perf_counter() - called
        out, elapsed = execute(handles, items, todo, writer, failures, s.progress)
    finally:
        for h in handles:
            h.close(interrupted=True)
            if isinstance(h, _InProcess):
                close_runner(h.pipeline.runner)
    pipelines = [h.result for h in handles if h.result is not None]
    summary = merge_summaries(pipelines, vars(out), len(todo), elapsed, infos[0]["name"], s.decoder)
    summary.update(skipped_already_done=len(items) - len(todo), executor="local", precision=infos[0]["precision"],
                   per_gpu=device_summaries(pipelines, elapsed), **out.clock.steady(),
                   **whole_run(start_s, time.perf_counter() - called))
    write_summary(s.output, summary)
    log_summary(summary, failures.path)
    finish_summary(s.output, summary, identity["random_init"])
    return summary
