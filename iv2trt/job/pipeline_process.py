"""A pipeline (job/pipeline.py) as the local executor drives it: in the executor's process (InProcessPipeline), or in a
process of its own fed through a pipe (PipelineProcess, whose side there is `_pipeline_main`): spawned, its GPU made
the process's only one through CUDA_VISIBLE_DEVICES, killed with its parent. Both take inputs (`feed`), hand back
finished and failed inputs (`poll`) and end with the pipeline's summary (`no_more`, `close`)."""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import traceback
from multiprocessing.connection import wait
from typing import Any

import numpy as np

from ..decode.inputs import InputItem
from ..decode.workers import start_worker_server
from ..errors import PipelineError
from .factory import SettingsRunner, close_runner, describe_runner, reference_runner
from .pipeline import JobOptions, Pipeline
from .placement import PipelineSpec

log = logging.getLogger(__name__)


class KeptEvents:
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


class InProcessPipeline:
    """A pipeline in this process: fed everything at once, stepped by the executor's loop."""

    def __init__(self, pipeline: Pipeline, events: KeptEvents):
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


class PipelineProcess:
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
    events = KeptEvents()
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


def started_pipelines(handles: list[PipelineProcess]) -> tuple[list[PipelineProcess], list[dict[str, Any]]]:
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
