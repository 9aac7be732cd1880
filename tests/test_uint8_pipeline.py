"""uint8 transport: resize/normalise split, runners' infer_uint8, the job's inference thread and run_preloaded."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from iv2trt.decode.clips import Windowing
from iv2trt.decode.source import iter_clips
from iv2trt.errors import PipelineError
from iv2trt.job.batching import InferenceThread
from iv2trt.job.pipeline import JobOptions, Pipeline, WriterSink
from iv2trt.output.writer import FailureLog, FeatureWriter, load_features
from iv2trt.runners.base import HostNormalize, infer_frames
from iv2trt.runners.onnxruntime_runner import OnnxRuntimeRunner
from iv2trt.runners.torch_runner import TorchRunner
from iv2trt.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize_frames, preprocess_frames, resize_frames


def _one_step_preprocess(frames, size):
    """The preprocessing as it was before the split (resize, round, /255, mean/std in one go)."""
    import torch.nn.functional as F

    x = torch.as_tensor(frames).permute(0, 3, 1, 2).float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        x = x.round_().clamp_(0, 255)
    x = x / 255.0
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


@pytest.mark.parametrize("shape, size", [((3, 100, 150), 56), ((2, 56, 56), 56), ((9, 37, 20), 56), ((2, 240, 320), 224)])
def test_split_is_bit_identical_to_one_step(shape, size):
    frames = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    small = resize_frames(frames, size)
    assert small.dtype == np.uint8 and small.shape == (shape[0], size, size, 3) and small.flags.c_contiguous
    expected = _one_step_preprocess(frames, size)
    assert torch.equal(preprocess_frames(frames, size), expected)
    assert torch.equal(normalize_frames(small), expected)
    # batched [B, T, H, W, 3], and written into float32 / float16 outputs (float32 values rounded once)
    batch = np.stack([small, small[::-1]])
    full = normalize_frames(batch)
    assert full.shape == (2, shape[0], 3, size, size) and full.is_contiguous()
    assert torch.equal(full[0], expected)
    out32 = np.empty(full.shape, np.float32)
    assert normalize_frames(batch, out=out32).data_ptr() == out32.__array_interface__["data"][0]
    np.testing.assert_array_equal(out32, full.numpy())
    out16 = np.empty(full.shape, np.float16)
    normalize_frames(batch, out=out16)
    np.testing.assert_array_equal(out16, full.numpy().astype(np.float16))


def test_normalize_refuses_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        normalize_frames(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="out must be"):
        normalize_frames(np.zeros((2, 8, 8, 3), np.uint8), out=np.empty((2, 8, 8, 3), np.float32))


def _clips(batch=3, frames=4, size=56, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (batch, frames, size, size, 3), dtype=np.uint8)


def test_torch_runner_infer_uint8_equals_float_path(tiny_model):
    runner = TorchRunner(tiny_model, device="cpu", precision="fp32")
    x = _clips()
    expected = runner.infer(normalize_frames(x).numpy())
    np.testing.assert_allclose(runner.infer_uint8(x), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(infer_frames(runner, x), expected, rtol=0, atol=1e-6)
    buf = runner.new_host_buffer((4, 4, 56, 56, 3))
    buf[:3] = x
    np.testing.assert_allclose(runner.infer_uint8(buf[:3]), expected, rtol=0, atol=1e-6)
    with pytest.raises(PipelineError, match="uint8 frames"):
        runner.infer_uint8(x.astype(np.float32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_runner_infer_uint8_on_gpu(tiny_model):
    import copy

    ref = TorchRunner(copy.deepcopy(tiny_model), device="cpu", precision="fp32")
    gpu = TorchRunner(copy.deepcopy(tiny_model), device="cuda", precision="fp32")
    x = _clips(batch=5)
    expected = ref.infer(normalize_frames(x).numpy())
    pinned = gpu.new_host_buffer(x.shape)
    pinned[:] = x
    for frames in (x, pinned):  # staged and direct uploads
        np.testing.assert_allclose(gpu.infer_uint8(frames), expected, rtol=1e-4, atol=1e-4)


def test_onnxruntime_infer_uint8_host_normalises_into_its_dtype(tiny_onnx):
    x = _clips(batch=2)
    for precision in ("fp32", "fp16"):
        runner = OnnxRuntimeRunner(tiny_onnx[precision])
        assert isinstance(runner, HostNormalize)
        np.testing.assert_array_equal(runner.infer_uint8(x), runner.infer(normalize_frames(x).numpy()))


def test_iter_clips_sends_resized_uint8(tmp_path):
    from iv2trt.decode.inputs import InputItem
    from iv2trt.decode.samples import pattern_frames, write_video

    write_video(tmp_path / "v.mp4", pattern_frames(12, 40, 64, seed=0))
    clips = list(iter_clips(InputItem(str(tmp_path / "v.mp4"), "v.mp4", "video"), Windowing(4), 56))
    assert len(clips) == 1 and clips[0][1].dtype == np.uint8 and clips[0][1].shape == (4, 56, 56, 3)


def _job(tmp_path, runner, batch=4, reference=None):
    writer = FeatureWriter(tmp_path, "float32", shard_size=100)
    return Pipeline(runner, JobOptions(Windowing(4), 56, batch, 1, progress=False),
                    WriterSink(writer, FailureLog(tmp_path)), reference)


def test_run_preloaded_writes_what_the_runner_computes(tmp_path, tiny_model):
    runner = TorchRunner(tiny_model, device="cpu", precision="fp32")
    rng = np.random.default_rng(1)
    videos = [[rng.integers(0, 256, (4, 56, 56, 3), dtype=np.uint8) for _ in range(n)] for n in (3, 5, 1, 2)]
    videos.append([rng.standard_normal((4, 3, 56, 56)).astype(np.float32)])  # a preprocessed (.npy) input
    summary = _job(tmp_path, runner, reference=TorchRunner(tiny_model, device="cpu", precision="fp32")) \
        .run_preloaded(videos)
    assert summary["ok"] == 5 and summary["failed"] == 0 and summary["clips"] == 12
    assert summary["batches"] == 4  # 11 uint8 clips in 3 batches of <= 4, the float clip in its own
    assert summary["compare_pytorch"]["max_abs_error"] == 0.0
    feats, rows = load_features(tmp_path)
    got = {(r["id"], r["clip"]): f for f, r in zip(feats, rows)}
    for number, clips in enumerate(videos):
        frames = np.stack(clips)
        raw = runner.infer_uint8(frames) if frames.dtype == np.uint8 else runner.infer(frames)
        expected = raw / np.linalg.norm(raw, axis=1, keepdims=True)
        np.testing.assert_allclose(np.stack([got[(f"preloaded/{number}", i)] for i in range(len(clips))]),
                                   expected, rtol=0, atol=1e-6)


class _Exploding:
    name, max_batch, frame_range = "exploding", None, (1, None)

    def __init__(self, after: int, exc: BaseException):
        self.calls, self.after, self.exc = 0, after, exc

    def infer_uint8(self, frames):
        self.calls += 1
        if self.calls > self.after:
            raise self.exc
        return np.ones((len(frames), 8), np.float32)


def test_inference_thread_error_reaches_the_main_thread(tmp_path):
    err = PipelineError("engine fell over")
    videos = [[np.zeros((4, 56, 56, 3), np.uint8)] * 4 for _ in range(6)]
    job = _job(tmp_path, _Exploding(after=2, exc=err))
    with pytest.raises(PipelineError) as info:
        job.run_preloaded(videos)
    assert info.value is err and info.value.exit_code == 2
    assert not job.inference.thread.is_alive()
    assert len(load_features(tmp_path)[1]) == 8  # the two videos finished before the error are kept

    thread = InferenceThread(_Exploding(after=0, exc=MemoryError("boom")))
    from iv2trt.job.batching import Batch as _Batch

    batch = _Batch(("|u1", (4, 56, 56, 3)), np.zeros((2, 4, 56, 56, 3), np.uint8))
    batch.add(0, 0, np.zeros((4, 56, 56, 3), np.uint8))
    assert thread.submit(batch)
    with pytest.raises(MemoryError, match="boom"):
        for _ in range(100):
            thread.results(timeout=0.1)
    thread.close()


def test_batches_finished_before_a_runner_error_are_returned_before_it():
    """The first batch is in the thread's hands when the second one's runner call raises: its features are
    returned first, then the error raises (from results and from submit)."""
    import threading

    from iv2trt.job.batching import Batch as _Batch

    second_submitted = threading.Event()

    class FirstWaitsThenFails:
        name, max_batch, frame_range = "first waits", None, (1, None)
        calls = 0

        def infer_uint8(self, frames):
            self.calls += 1
            if self.calls == 1:
                assert second_submitted.wait(10)  # the second batch is queued before the first one returns
                return np.full((len(frames), 8), 3.0, np.float32)
            raise PipelineError("engine fell over")

    def batch(value):
        b = _Batch(("|u1", (4, 56, 56, 3)), np.zeros((2, 4, 56, 56, 3), np.uint8))
        b.add(value, 0, np.full((4, 56, 56, 3), value, np.uint8))
        return b

    thread = InferenceThread(FirstWaitsThenFails())
    first = batch(1)
    assert thread.submit(first) and thread.submit(batch(2))
    second_submitted.set()
    thread.thread.join(10)
    assert not thread.thread.is_alive()
    done = thread.results(timeout=0.1)
    assert [d[0] for d in done] == [first] and float(done[0][1][0, 0]) == 3.0
    with pytest.raises(PipelineError, match="fell over"):
        thread.results(timeout=0.1)
    with pytest.raises(PipelineError, match="fell over"):
        thread.submit(batch(3))
    thread.close()


def test_failed_input_rows_are_dropped_from_open_batches():
    from iv2trt.job.batching import Batch as _Batch

    batch = _Batch(("|u1", (1,)), np.zeros((4, 1), np.uint8))
    for i, n in enumerate((0, 1, 0, 2)):
        batch.add(n, i, np.array([10 * n + i], np.uint8))
    batch.drop(0)
    assert batch.rows == [(1, 1), (2, 3)] and batch.frames[:2, 0].tolist() == [11, 23] and not batch.full


def _fake_trt_runner(dtype, max_batch=2, min_batch=1):
    """TensorRTRunner's buffer logic without a GPU: the 'engine' returns each row's sum and mean."""
    import threading
    from types import SimpleNamespace

    from iv2trt.runners.tensorrt_runner import TensorRTRunner

    r = object.__new__(TensorRTRunner)
    r._lock = threading.Lock()
    r.frame_range, r.chw, r.feature_dim = (1, 4), (3, 8, 8), 2
    r.min_batch, r.max_batch, r.input_name, r.output_name = min_batch, max_batch, "frames", "features"
    r.device_in = r.device_out = None
    r.host_in = np.empty((max_batch, 4, 3, 8, 8), dtype)
    r.host_out = np.empty((max_batch, 2), np.float32)
    device = {}
    r.context_cuda = SimpleNamespace(push=lambda: None, pop=lambda: None)
    r.stream = SimpleNamespace(handle=0, synchronize=lambda: None)

    def execute(_):
        x = device["in"].astype(np.float64).reshape(len(device["in"]), -1)
        device["out"] = np.stack([x.sum(1), x.mean(1)], 1).astype(np.float32)
        return True

    r.context = SimpleNamespace(set_input_shape=lambda name, shape: device.__setitem__("shape", shape) or True,
                                get_tensor_shape=lambda name: (device["shape"][0], 2), execute_async_v3=execute)
    r.cuda = SimpleNamespace(memcpy_htod_async=lambda dst, src, stream: device.__setitem__("in", src.copy()),
                             memcpy_dtoh_async=lambda dst, src, stream: dst.__setitem__(slice(None),
                                                                                          device["out"]))
    return r


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_tensorrt_infer_uint8_normalises_into_the_pinned_input(dtype):
    runner = _fake_trt_runner(dtype, max_batch=2, min_batch=2)
    x = _clips(batch=3, frames=4, size=8, seed=3)  # 3 rows: chunks of 2 and 1 (padded to 2)
    expected = runner.infer(normalize_frames(x).numpy())
    np.testing.assert_array_equal(runner.infer_uint8(x), expected)
    with pytest.raises(PipelineError, match="outside this engine's profile range"):
        runner.infer_uint8(_clips(batch=1, frames=5, size=8))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_tensorrt_takes_gpu_frames_device_to_device(dtype, monkeypatch):
    """GPU-decoded clips (a CUDA tensor) reach the engine without host memory: normalised by PyTorch where they
    are, then one device-to-device copy per chunk, padding rows zeroed on the device. A CPU tensor and a fake
    pycuda that reads 'device' addresses as host ones stand in for the GPU; the features must equal the host
    path's (3 rows: chunks of 2 and 1, the second padded to the engine's minimum batch of 2)."""
    import ctypes
    from types import SimpleNamespace

    import torch

    x = _clips(batch=3, frames=4, size=8, seed=5)
    expected = _fake_trt_runner(dtype, max_batch=2, min_batch=2).infer_uint8(x)
    runner = _fake_trt_runner(dtype, max_batch=2, min_batch=2)
    runner.input_dtype, runner.device_in = dtype, 0  # the fake's device address
    upload = runner.cuda.memcpy_htod_async  # the fake engine reads what this was given
    rows: dict = {}

    def dtod(dst, src, size, stream):
        rows["in"] = np.frombuffer((ctypes.c_uint8 * size).from_address(src), dtype).reshape(-1, 4, 3, 8, 8).copy()
        upload(None, rows["in"], None)

    def memset(dst, value, size, stream):
        assert value == 0
        rows["in"] = np.concatenate([rows["in"], np.zeros((size // rows["in"][0].nbytes, 4, 3, 8, 8), dtype)])
        upload(None, rows["in"], None)

    runner.cuda = SimpleNamespace(memcpy_dtod_async=dtod, memset_d8_async=memset,
                                  memcpy_htod_async=lambda *a: pytest.fail("pixels went through host memory"),
                                  memcpy_dtoh_async=runner.cuda.memcpy_dtoh_async)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(synchronize=lambda: None))
    np.testing.assert_array_equal(runner._infer_device(torch.from_numpy(x)), expected)
