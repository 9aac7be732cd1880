"""The local executor: pipelines on this machine (job/pipeline.py), `--pipelines-per-gpu` per GPU, fed from one
queue; this process is the only writer.

job/placement.py decides where they run (`--gpus`). One pipeline runs in this process where the job has the CPU or
GPU 0 alone with one pipeline. Otherwise each pipeline runs in a process of its own (job/pipeline_process.py) with
its NVDEC sessions, its share of the CPU decode workers and its runner: NVDEC threads of several GPUs in one
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
import sys
import time
from collections import Counter, deque
from multiprocessing.connection import wait
from typing import Any, Sequence

import numpy as np

from ..decode.inputs import InputItem
from ..decode.plan import check_decoder, pipelines_per_gpu
from ..decode.workers import start_worker_server
from ..errors import PipelineError
from ..output.writer import FailureLog, FeatureWriter, prepare_output, write_summary
from ..runners.choice import encoder_on_cpu
from .factory import SettingsRunner, close_runner, describe_runner, reference_runner
from .identity import complete_identity, finish_summary
from .pipeline import JobOptions, Pipeline
from .pipeline_process import InProcessPipeline, KeptEvents, PipelineProcess, started_pipelines
from .placement import PipelineSpec, pipeline_specs
from .stages import FailureLines, ResultClock, whole_run
from .summary import device_summaries, log_summary, merge_summaries

log = logging.getLogger(__name__)

DIED_TWICE = "the pipeline processes decoding it died twice"


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
            if len(live) > 1 or not isinstance(live[0], InProcessPipeline):
                wait([h.conn for h in live if isinstance(h, PipelineProcess)], timeout=0.2)
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
            waiting = [h for h in live if isinstance(h, PipelineProcess) and h.result is None and h.gone is None]
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
            if isinstance(h, PipelineProcess):
                h.stop(interrupted)
        for h in handles:
            h.close(interrupted)
        log.debug("pipelines closed in %.2f s", time.perf_counter() - closing)
        bar.close()
        writer.flush()  # finished videos are kept even when the job stops early
        out.said.close()
    return out, (ended or time.perf_counter()) - started


def run_job(items: list[InputItem], runner, out_dir, writer: FeatureWriter, options: JobOptions,
            reference=None, skipped: int = 0) -> dict[str, Any]:
    """One pipeline in this process over `items` with `runner`; writes summary.json (counts, speeds, where the
    time went) and returns the summary."""
    failures = FailureLog(out_dir)
    events = KeptEvents()
    pipeline = Pipeline(runner, options, events, reference).start(items)
    out, elapsed = execute([InProcessPipeline(pipeline, events)], items, range(len(items)), writer, failures,
                           options.progress)
    summary = merge_summaries([pipeline.summary()], vars(out), len(items), elapsed, runner.name, options.decoder)
    summary.update(skipped_already_done=skipped, **out.clock.steady())
    write_summary(out_dir, summary)
    log_summary(summary, failures.path)
    return summary


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
            events = KeptEvents()
            handles = [InProcessPipeline(Pipeline(runner, options, events, reference, specs[0].name), events)]
            infos = [info]
        else:
            ctx = mp.get_context("spawn")
            verbose = logging.getLogger().isEnabledFor(logging.DEBUG)
            for spec in specs:
                share = dataclasses.replace(options, workers=max(1, int(s.workers * spec.share)) if s.workers else None,
                                            cpu_share=spec.share)
                handles.append(PipelineProcess(ctx, spec, factory, share, compare, verbose))
            handles, infos = started_pipelines(handles)
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
        if isinstance(handles[0], InProcessPipeline):
            handles[0].pipeline.start([items[n] for n in todo])
        writer = FeatureWriter(s.output, s.dtype, s.shard_size, s.per_video_npy, s.commit_seconds)
        failures = FailureLog(s.output)
        start_s = time.perf_counter() - called
        out, elapsed = execute(handles, items, todo, writer, failures, s.progress)
    finally:
        for h in handles:
            h.close(interrupted=True)
            if isinstance(h, InProcessPipeline):
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
