"""The PyTorch runner: the model in fp16 with its fused kernels on a GPU (compiled, replayed as CUDA graphs),
fp32 on the CPU; the reference that every other backend is compared with."""
from __future__ import annotations

import logging

import numpy as np

from ..capture_guard import GUARD
from ..errors import PipelineError
from .base import check_uint8_frames, normalized_shape, reusable_buffer

log = logging.getLogger(__name__)


class TorchRunner:
    """The PyTorch model; fp16 with fused kernels on a GPU, fp32 on CPU by default.

    `infer_uint8` on a GPU: uint8 frames go up through a pinned buffer (the caller's own when it came from
    `new_host_buffer`, else one of two staging buffers) on a copy stream, are normalised on the GPU in
    float32 and cast to the model's dtype (the float path's values, rounded once). Frames already on the GPU
    (a CUDA tensor from the GPU decoders) are normalised where they are. `submit_uint8` starts a
    batch and returns a function that waits for its features, so the next batch's upload overlaps this
    one's compute. Each input shape's forward pass is captured once as a CUDA graph (`cuda_graphs`) and
    replayed, which removes the per-kernel launch cost that dominates small batches; a large batch is
    captured as `graph_streams` parts on parallel streams (see `_forward_parts`).
    The model is moved to the device and dtype in place and switched to fused kernels. On a GPU in fp16/bf16
    it is also torch.compile'd (`compile_mode`, see runners/compile.py): a new input shape runs the eager model
    (uncaptured while a compile is in flight) until its compiled form is ready, compiled in the background
    (`compile_in_background`) and cached on disk; then its graph is captured from the compiled form.
    `prepare(shapes)` compiles and captures ahead of time."""

    name = "torch"
    MAX_GRAPHS = 8
    # default graph_streams on a GPU ($IV2TRT_GRAPH_STREAMS overrides: models/kernels/switches.py); 1 where the model
    # defers its norms into quack's products (one stream measured faster there)
    GRAPH_STREAMS = 2
    MIN_PART_FRAMES = 64   # a batch splits over the streams only when each part has this many frames
    MAX_CAPTURE_FAILURES = 3  # failed captures of one input shape before it runs without a graph for good

    def __init__(self, model, device: str | None = None, precision: str | None = None, cuda_graphs: bool = True,
                 compile_mode: str | None = None, compile_in_background: bool = True,
                 graph_streams: int | None = None):
        import torch

        from ..models.kernels import switches
        from .compile import CompiledForward, resolve_mode

        self.torch = torch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        precision = precision or ("fp16" if self.device.type == "cuda" else "fp32")
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        self.precision = precision
        if self.device.type == "cuda":  # quack and FA4 read them when first imported (models/kernels/fused_ops.py)
            switches.set_cache_env()
        try:  # (the switches' values are checked here: a bad one is a ValueError naming it)
            self.model = model.to(device=self.device, dtype=self.dtype).eval().set_fused_kernels(True)
            self.graph_streams = graph_streams or switches.graph_streams(
                1 if getattr(self.model, "defers_norms", False) else self.GRAPH_STREAMS)
        except ValueError as exc:
            raise PipelineError(str(exc)) from None
        self.max_batch = None
        self.frame_range = (1, None)
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._part_streams: list = []
        self.replay_larger_graphs = True  # False: every batch size gets its own graph (benchmarks)
        self.captures_closed = False  # True: the graphs captured so far are all there will be (serve_eager)
        self.compile_mode = resolve_mode(compile_mode, self.device.type, self.dtype)
        self.compiled = CompiledForward(self.model, self.compile_mode, background=compile_in_background) \
            if self.compile_mode else None
        self._graphs: dict[tuple[int, ...], tuple] = {}  # shape -> (graph, static in, static out, captured callable)
        self._capture_failures: dict[tuple[int, ...], int] = {}
        self._staging = [None, None]                     # pinned uint8 buffers, used in turn
        self._staging_done = [None, None]                # copy-stream events: staging buffer free again
        self._turn = 0
        self._pinned: dict[int, tuple[int, int]] = {}  # id -> (address, bytes) of buffers from new_host_buffer
        if self.device.type == "cuda":
            self._copy_stream = torch.cuda.Stream(self.device)
            self._graph_pool = torch.cuda.graph_pool_handle()

    def serve_eager(self, graph_for: tuple[int, int] | None = None) -> bool:
        """From now on the eager model serves, without torch.compile: for a pipeline whose GPU decodes in this
        process (the compile's Python work holds the GIL its NVDEC threads need). With `graph_for` (batch,
        frames), that shape's CUDA graph of the eager model is captured now, before the pipeline decodes anything,
        and replayed from then on (smaller batches replay it too); no capture happens later (one beside NVDEC's
        and the CPU workers' CUDA calls was spoilt). Without it, or where that capture fails, no CUDA graphs.
        True if the runner changed (a compile dropped, graphs dropped or captured)."""
        changed = self.compiled is not None
        self.compiled, self.compile_mode = None, None
        if any(e[3] is not self.model for e in self._graphs.values()):
            # the compiled model's graphs go, and with them the memory pool every graph shared (on an H200 a capture
            # into the pool of graphs dropped failed an allocator assertion): a fresh pool, no graphs
            self._graphs = {}
            if self.device.type == "cuda":
                self._graph_pool = self.torch.cuda.graph_pool_handle()
        if graph_for is not None and self.cuda_graphs:
            if tuple(graph_for) not in {k[:2] for k in self._graphs}:
                self.prepare([graph_for])  # captured here, with nothing else on the GPU yet
                changed = True
            self.captures_closed = True
            self.cuda_graphs = bool(self._graphs)
        elif self.cuda_graphs:
            self.cuda_graphs, changed = False, True
        return changed

    @property
    def takes_cuda_frames(self) -> bool:
        """infer_uint8/submit_uint8 accept a uint8 CUDA tensor and read it in place."""
        return self.device.type == "cuda"

    def infer(self, frames: np.ndarray):
        with self.torch.inference_mode():
            x = self.torch.as_tensor(frames).to(self.device, self.dtype, non_blocking=True)
            return self.forward_device(x).float().cpu().numpy()

    def forward_device(self, x):
        """model(x) for a tensor already on the device, replaying the CUDA graph captured for x's shape
        (captured on first sight, from the compiled model once it is ready). The result may be the graph's
        static output: read it before the next call."""
        with self.torch.inference_mode():
            key = tuple(x.shape)
            if self.cuda_graphs and self.replay_larger_graphs and key not in self._graphs:
                larger = [k for k in self._graphs if k[1:] == key[1:] and k[0] > key[0]]
                if larger:
                    # a smaller batch (a job's last, a lone clip) replays the next larger graph (extra rows
                    # ignored) and never asks for a compile of its own shape (batch 1 is a class of its own)
                    graph, static_in, static_out, _ = self._graphs[min(larger)]
                    static_in[:len(x)].copy_(x)
                    graph.replay()
                    return static_out[:len(x)]
            forward = self.compiled.select(x) if self.compiled is not None else self.model
            if not self.cuda_graphs:
                return forward(x)
            entry = self._graphs.get(key)
            if entry is None or entry[3] is not forward:
                capturable = not self.captures_closed and (self.compiled is None or not self.compiled.busy)
                capturable = capturable and self._capture_failures.get(key, 0) < self.MAX_CAPTURE_FAILURES
                if capturable and (entry is not None or len(self._graphs) < self.MAX_GRAPHS):
                    self._graphs.pop(key, None)  # an eager graph gives way to the compiled one
                    entry = self._try_capture(key, forward, x)
                if entry is None:
                    return forward(x)
            graph, static_in, static_out, _ = entry
            static_in.copy_(x)
            graph.replay()
            return static_out

    def warm_up(self, batch: int, frames: int, size: int, wait: bool = True) -> None:
        """Get full batches ready: compile (in the background) and, with `wait`, block until the compile is done
        and the CUDA graph captured. A pipeline starts its decoders without waiting: until the compiled model is
        ready, batches run the eager fp16 model (still far faster than decoding), and the graph is captured on
        first sight after (with NVDEC's calls held back meanwhile: capture_guard). Partial batches
        replay the full batch's graph."""
        if self.device.type == "cuda":
            self.prepare([(batch, frames)], wait=wait)

    def _try_capture(self, key: tuple, forward, x) -> tuple | None:
        """The graph of `forward` for x's shape, or None where the capture failed: that call (and the next ones,
        until a capture succeeds, at most MAX_CAPTURE_FAILURES tries) runs without a graph, and the job goes on."""
        try:
            entry = self._graphs[key] = self._capture(forward, x)
            return entry
        except RuntimeError as exc:
            self.torch.cuda.synchronize(self.device)
            failures = self._capture_failures[key] = self._capture_failures.get(key, 0) + 1
            self._graph_pool = self.torch.cuda.graph_pool_handle()  # a fresh pool for the next capture
            log.warning("CUDA graph capture of input %s failed (%s); %s", tuple(x.shape), str(exc).splitlines()[0],
                        "running without a graph from now on" if failures >= self.MAX_CAPTURE_FAILURES
                        else "this call runs without one")
            return None

    def _capture(self, forward, x) -> tuple:
        torch = self.torch
        static_in = x.clone()
        parts = self._graph_parts(forward, x)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: kernels picked and workspaces allocated outside the capture
                for part in parts:
                    forward(static_in[part])
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread-local capture: the CUDA calls of other threads (the decode workers' copies) neither fail in the
        # capture nor spoil it; NVDEC's calls synchronise the context, so none runs meanwhile (capture_guard)
        with GUARD.exclusive(), torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
            static_out = self._forward_parts(forward, static_in, parts)
        log.debug("captured a CUDA graph for input %s (%s, %d stream(s))", tuple(x.shape),
                  "eager" if forward is self.model else f"compiled, {self.compile_mode}", len(parts))
        return graph, static_in, static_out, forward

    def _graph_parts(self, forward, x) -> list[slice]:
        """The batch slices captured on parallel streams: `graph_streams` equal parts when the batch splits
        into parts of 2 or more clips that run the same compiled specialisation (or the eager model), else
        the whole batch."""
        n, batch = self.graph_streams, x.shape[0]
        if n < 2 or batch % n or batch // n < 2 or batch // n * x.shape[1] < self.MIN_PART_FRAMES:
            return [slice(None)]
        if forward is not self.model and not self.compiled.ready((batch // n, *x.shape[1:])):
            return [slice(None)]
        step = batch // n
        return [slice(i * step, (i + 1) * step) for i in range(n)]

    def _forward_parts(self, forward, x, parts: list[slice]):
        """forward over the batch parts, each on its own stream forked from the current one and joined back,
        so one part's memory-bound kernels and kernel tails overlap another's compute (inside a CUDA graph
        the parts are parallel branches)."""
        torch = self.torch
        if len(parts) == 1:
            return forward(x)
        while len(self._part_streams) < len(parts):
            self._part_streams.append(torch.cuda.Stream(self.device))
        current = torch.cuda.current_stream(self.device)
        outs = []
        for part, stream in zip(parts, self._part_streams):
            stream.wait_stream(current)
            with torch.cuda.stream(stream):
                outs.append(forward(x[part]))
        for stream in self._part_streams[:len(parts)]:
            current.wait_stream(stream)
        return torch.cat(outs)

    def prepare(self, batch_frames, wait: bool = True) -> None:
        """Get ready for inputs of these (batch, frames): request their compiles (torch.compile on) and, with
        `wait`, block until those are done and capture each shape's CUDA graph."""
        torch, size = self.torch, self.model.cfg.img_size
        # (drawn on the CPU: the GPU's generator is left as it is, also after a failed capture)
        inputs = [torch.randn(b, t, 3, size, size).to(self.device, self.dtype) for b, t in batch_frames]
        if self.compiled is not None:
            for x in inputs:
                self.compiled.request(x)
        if not wait:
            return
        if self.compiled is not None:
            self.compiled.wait()
        for x in inputs:
            self.forward_device(x)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        """Stop the compile thread after its current compile (without waiting) and drop the captured graphs."""
        if self.compiled is not None:
            self.compiled.close()
        self._graphs.clear()

    def new_host_buffer(self, shape: tuple[int, ...], dtype=np.uint8) -> np.ndarray:
        """An empty host array to assemble batches in: page-locked when the model is on a GPU (uploaded
        without a staging copy by infer_uint8), plain memory otherwise."""
        if self.device.type != "cuda":
            return np.empty(shape, dtype)
        import weakref

        tensor = self.torch.empty(shape, dtype=self.torch.from_numpy(np.empty(0, dtype)).dtype, pin_memory=True)
        array = tensor.numpy()  # keeps `tensor` (and its pinned memory) alive
        key = id(tensor)
        self._pinned[key] = (tensor.data_ptr(), tensor.numel() * tensor.element_size())
        weakref.finalize(tensor, self._pinned.pop, key, None)
        return array

    def _is_pinned(self, frames: np.ndarray) -> bool:
        start = frames.__array_interface__["data"][0]
        return any(a <= start and start + frames.nbytes <= a + n for a, n in list(self._pinned.values()))

    def _pinned_source(self, frames: np.ndarray):
        """(pinned tensor of frames, event to record once its upload is queued): the caller's buffer
        (no event), or the next staging buffer once its previous upload has finished."""
        torch = self.torch
        x = torch.from_numpy(frames)
        if self._is_pinned(frames):
            return x, None
        turn, self._turn = self._turn, 1 - self._turn
        if self._staging_done[turn] is not None:
            self._staging_done[turn].synchronize()  # its previous upload has finished
        if self._staging[turn] is None or self._staging[turn].numel() < x.numel():
            self._staging[turn] = torch.empty(x.numel(), dtype=torch.uint8, pin_memory=True)
        staged = self._staging[turn][:x.numel()].view(x.shape)
        staged.copy_(x)
        self._staging_done[turn] = torch.cuda.Event()
        return staged, self._staging_done[turn]

    def submit_uint8(self, frames: np.ndarray):
        """Start `infer_uint8(frames)`; returns a function that waits for and returns the features.

        A caller's pinned buffer (new_host_buffer) must stay untouched until that function returned."""
        from ..transforms import normalize_frames

        torch = self.torch
        if isinstance(frames, torch.Tensor) and frames.is_cuda and self.takes_cuda_frames:
            return self._submit_device(frames)
        frames = check_uint8_frames(frames)
        if self.device.type != "cuda":
            with torch.inference_mode():
                x = normalize_frames(frames, out=reusable_buffer(self, normalized_shape(frames.shape), np.float32))
                result = self.forward_device(x.to(self.dtype)).float().numpy()
            return lambda: result
        with torch.inference_mode():
            source, uploaded = self._pinned_source(frames)
            compute = torch.cuda.current_stream(self.device)
            with torch.cuda.stream(self._copy_stream):
                x = source.to(self.device, non_blocking=True)
                if uploaded is not None:
                    uploaded.record(self._copy_stream)
            compute.wait_stream(self._copy_stream)
            x.record_stream(compute)
            return self._encode_on_device(x)

    def _submit_device(self, frames):
        """submit_uint8 for uint8 frames [B, T, H, W, 3] already in GPU memory (read on the current stream)."""
        return self._encode_on_device(check_uint8_frames(frames).to(self.device, non_blocking=True))

    def _encode_on_device(self, x):
        """Queue normalise + forward of uint8 frames x on the GPU (current stream) and the copy of the features
        to pinned host memory; returns a function that waits for them."""
        from ..transforms import normalize_frames

        torch = self.torch
        with torch.inference_mode():
            features = self.forward_device(normalize_frames(x).to(self.dtype)).float()
            host = torch.empty(features.shape, dtype=torch.float32, pin_memory=True)
            host.copy_(features, non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))

        def wait() -> np.ndarray:
            done.synchronize()
            return host.numpy()
        return wait

    def infer_uint8(self, frames: np.ndarray) -> np.ndarray:
        return self.submit_uint8(frames)()
